import pytest
import torch

from accuquant_pl.diffusion import ConditioningSpec


def test_class_labels_cycle_over_the_sample_numbers_with_the_unconditional_label():
    spec = ConditioningSpec(class_labels=[3, 5], uncond_class_label=10, guidance_scale=2.0)
    cond = spec.for_samples(torch.tensor([0, 1, 2, 7]))
    assert cond.class_labels.tolist() == [3, 5, 3, 5]
    assert cond.uncond_class_labels.tolist() == [10] * 4 and cond.guidance_scale == 2.0
    # what a stored item records gives the same conditioning back
    again = spec.for_items(spec.indices(torch.tensor([0, 1, 2, 7])))
    assert torch.equal(again.class_labels, cond.class_labels)


def test_prompts_cycle_and_the_file_is_checked(tmp_path):
    path = tmp_path / "p.pt"
    torch.save({"cond": torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4), "uncond": torch.zeros(2, 4)}, path)
    cond = ConditioningSpec(prompt_embeddings=str(path), guidance_scale=3.0).for_samples(torch.tensor([4, 2]))
    assert torch.equal(cond.encoder_hidden_states, torch.load(path)["cond"][[1, 2]])
    assert cond.uncond_encoder_hidden_states.shape == (2, 2, 4)
    torch.save({"cond": torch.zeros(3, 2, 4)}, path)
    with pytest.raises(ValueError, match="needs an 'uncond' embedding"):
        ConditioningSpec(prompt_embeddings=str(path), guidance_scale=3.0).prompts()
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        ConditioningSpec(prompt_embeddings=str(tmp_path / "nowhere.pt")).prompts()


def test_prompt_attention_masks_follow_their_prompts(tmp_path):
    path = tmp_path / "p.pt"
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    torch.save({"cond": torch.randn(3, 3, 4), "uncond": torch.zeros(3, 4), "cond_mask": mask,
                "uncond_mask": torch.tensor([1, 0, 0])}, path)
    cond = ConditioningSpec(prompt_embeddings=str(path), guidance_scale=3.0).for_samples(torch.tensor([4, 2]))
    assert torch.equal(cond.kwargs()["encoder_attention_mask"], mask[[1, 2]])
    assert cond.kwargs(uncond=True)["encoder_attention_mask"].tolist() == [[1, 0, 0]] * 2


@pytest.mark.parametrize(("content", "message"), [
    ({"cond_mask": torch.ones(3, 2)}, r"'cond_mask' has shape \(3, 2\), expected \(3, 3\)"),
    ({"cond_mask": torch.ones(3, 3), "uncond_mask": torch.ones(2)}, r"'uncond_mask' has shape \(2,\), expected \(3,\)"),
    ({"cond_mask": torch.ones(3, 3)}, r"holds \['cond_mask'\] with 'uncond'"),
    ({"uncond_mask": torch.ones(3)}, r"holds \['uncond_mask'\]"),
    ({"cond_mask": [[1, 1, 0]] * 3, "uncond_mask": torch.ones(3)}, r"'cond_mask' is a list, expected a tensor"),
    ({"cond": torch.randn(3, 4)}, r"'cond' tensor \(P, L, D\).*found shape \(3, 4\)"),
])
def test_bad_prompt_masks_are_named(tmp_path, content, message):
    path = tmp_path / "p.pt"
    torch.save({"cond": torch.randn(3, 3, 4), "uncond": torch.zeros(3, 4), **content}, path)
    with pytest.raises(ValueError, match=message):
        ConditioningSpec(prompt_embeddings=str(path)).prompts()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"class_labels": [1], "prompt_embeddings": "p.pt"}, "class_labels or prompt_embeddings, not both"),
    ({"class_labels": [1], "guidance_scale": 2.0}, "needs uncond_class_label"),
    ({"class_labels": []}, "class_labels is empty"),
])
def test_bad_specs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConditioningSpec(**kwargs)


def test_an_unconditional_spec_conditions_nothing():
    assert ConditioningSpec().for_samples(torch.tensor([0, 1])) is None
