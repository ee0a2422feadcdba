import json

import lightning as L
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from accuquant_pl.data.batching import StartBatchSampler, collate_by_start, sub_batches
from accuquant_pl.data.groups import TrajectoryGroups, group_starts
from accuquant_pl.data.plan import EpochPlan
from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.data.trajectory_cache import CacheError
from accuquant_pl.diffusion import ConditioningSpec


def make_dm(model_dir, tmp_path, **kw):
    args = dict(pretrained=str(model_dir), num_inference_steps=5, num_trajectories=4, batch_size=2,
                cache_dir=str(tmp_path / "cache"))
    args.update(kw)
    return TrajectoryDataModule(**args)


def test_cache_round_trip_and_group_items(tiny_model_dir, tmp_path):
    dm = make_dm(tiny_model_dir, tmp_path, group_size=3)
    dm.prepare_data()
    dm.setup("fit")
    states = dm.tensors["states"]
    assert states.shape == (4, 6, 1, 8, 8) and dm.tensors["model_outputs"].shape == (4, 5, 1, 8, 8)
    item = dm.train_set[len(dm.train_set) - 1]
    i, j = dm.train_set.index[-1]
    assert (i, j) == (3, 2)
    assert torch.equal(item["x"], states[3, 2]) and torch.equal(item["target"], states[3, 5])
    assert torch.equal(item["timesteps"], dm.tensors["timesteps"][2:5])
    # The same config finds the cache again instead of re-sampling.
    again = make_dm(tiny_model_dir, tmp_path, group_size=3)
    again.prepare_data()
    again.setup("fit")
    assert torch.equal(again.tensors["states"], states)


def test_trajectories_reproduce_with_same_seed(tiny_model_dir, tmp_path):
    a = make_dm(tiny_model_dir, tmp_path / "a")
    b = make_dm(tiny_model_dir, tmp_path / "b", sampling_batch_size=3)
    for dm in (a, b):
        dm.prepare_data()
        dm.setup("fit")
    assert torch.allclose(a.tensors["states"], b.tensors["states"], atol=1e-6)


def test_group_starts():
    assert group_starts(6, 2, "all") == [0, 1, 2, 3, 4]
    assert group_starts(6, 2, "windows") == [0, 2, 4]
    with pytest.raises(ValueError, match="larger than the schedule"):
        group_starts(6, 7, "all")
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        group_starts(6, 0, "all")
    with pytest.raises(ValueError, match="'middle'"):
        group_starts(6, 2, "middle")


def test_corrupt_cache_is_rejected_then_rebuilt(tiny_model_dir, tmp_path):
    dm = make_dm(tiny_model_dir, tmp_path)
    dm.prepare_data()
    folder = dm.cache_folder(dm.cache_key())
    with open(folder / "trajectories.pt", "ab") as f:
        f.write(b"garbage")
    with pytest.raises(CacheError, match="corrupt"):
        make_dm(tiny_model_dir, tmp_path).prepare_data()
    fixed = make_dm(tiny_model_dir, tmp_path, rebuild=True)
    fixed.prepare_data()
    fixed.setup("fit")


def test_cache_of_another_configuration_is_rejected(tiny_model_dir, tmp_path):
    dm = make_dm(tiny_model_dir, tmp_path, cache_path=str(tmp_path / "shared"))
    dm.prepare_data()
    other = make_dm(tiny_model_dir, tmp_path, cache_path=str(tmp_path / "shared"), seed=7)
    with pytest.raises(CacheError, match="seed: cache has 0, config asks 7"):
        other.prepare_data()
    with pytest.raises(CacheError, match="another configuration"):
        other.setup("fit")


def test_truncated_manifest_is_rejected(tiny_model_dir, tmp_path):
    dm = make_dm(tiny_model_dir, tmp_path)
    dm.prepare_data()
    manifest = dm.cache_folder(dm.cache_key()) / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])
    with pytest.raises(CacheError, match="corrupt manifest.json"):
        make_dm(tiny_model_dir, tmp_path).setup("fit")


@pytest.mark.parametrize("kwargs, match", [
    ({"num_trajectories": 2, "batch_size": 4}, r"num_trajectories \(2\) is smaller than batch_size \(4\)"),
    ({"group_size": 0}, "group_size must be >= 1, got 0"),
    ({"group_size": 9}, "group_size 9 is larger than the schedule"),
    ({"num_inference_steps": 0}, "num_inference_steps must be >= 1, got 0"),
    ({"starts_per_batch": 3, "batch_size": 4}, "starts_per_batch must be >= 1 and divide batch_size 4, got 3"),
    ({"starts_per_batch": 0}, "starts_per_batch must be >= 1 and divide batch_size 2, got 0"),
    ({"starts_per_batch": 4, "batch_size": 4, "group_size": 3}, "starts_per_batch 4 exceeds the 3 group starts"),
    ({"starts_per_batch": 2, "batch_size": 4, "group_size": 3, "group_ablations": {"group_starts": "windows"}},
     "starts_per_batch 2 exceeds the 1 group starts"),
    ({"group_ablations": {"group_starts": "middle"}}, "--data.init_args.group_ablations.group_starts: unknown value 'middle'"),
])
def test_bad_settings(tiny_model_dir, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dm(tiny_model_dir, tmp_path, **kwargs)


def test_class_conditional_trajectories(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=11)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "m")
    dm = make_dm(tmp_path / "m", tmp_path,
                 conditioning=ConditioningSpec(class_labels=[1, 2], uncond_class_label=10, guidance_scale=2.0))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tensors["class_labels"].tolist() == [1, 2, 1, 2]
    batch = next(iter(dm.train_dataloader()))
    cond = dm.conditioning(batch)
    assert cond.guided and torch.equal(cond.uncond_class_labels, torch.full_like(batch["class_labels"], 10))


def test_text_conditional_trajectories(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                norm_num_groups=4, cross_attention_dim=6, attention_head_dim=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "m")
    torch.save({"cond": torch.randn(3, 5, 6), "uncond": torch.zeros(1, 5, 6)}, tmp_path / "prompts.pt")
    dm = make_dm(tmp_path / "m", tmp_path,
                 conditioning=ConditioningSpec(prompt_embeddings=str(tmp_path / "prompts.pt"), guidance_scale=3.0))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tensors["prompt_index"].tolist() == [0, 1, 2, 0]
    batch = next(iter(dm.train_dataloader()))
    cond = dm.conditioning(batch)
    assert cond.encoder_hidden_states.shape == (2, 5, 6)


def test_start_weighting_prefers_late_steps(tiny_model_dir, tmp_path):
    dm = make_dm(tiny_model_dir, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    w = dm.train_set.start_weights("linear")
    assert w.shape == (len(dm.train_set.starts),) and w[4] > w[0]
    # The sampler draws with these weights: over many batches the last start comes up more often than the first.
    counts = torch.zeros(len(w))
    for batch in StartBatchSampler(dm.train_set, 2, num_batches=400, weighting="linear", seed=5):
        counts[dm.train_set.index[batch[0]][1]] += 1
    assert counts[4] > 2 * counts[0]
    with pytest.raises(ValueError, match="'cubic'"):
        dm.train_set.start_weights("cubic")
    with pytest.raises(ValueError, match="'cubic'"):
        StartBatchSampler(dm.train_set, 2, num_batches=1, weighting="cubic")


def test_history_needs_model_outputs(tiny_model_dir, tmp_path):
    dm = make_dm(tiny_model_dir, tmp_path, keep_model_outputs=False)
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(ValueError, match="keep_model_outputs"):
        TrajectoryGroups(dm.tensors, 1, "all", history=1)
    assert json.loads((dm.cache_folder(dm.cache_key()) / "manifest.json").read_text())["key"]["keep_model_outputs"] is False


def test_activation_calibration_inputs_are_what_the_sampler_feeds_the_network(tiny_model_dir, tmp_path):
    # Euler scales the state by 1 / sqrt(sigma^2 + 1) before the network; ranges fitted on unscaled states
    # would clip or waste the activation grid at sampling time.
    dm = make_dm(tiny_model_dir, tmp_path, scheduler="euler")
    dm.prepare_data()
    dm.setup("fit")
    sched = dm.make_scheduler()
    batches = dm.calibration_inputs(num_samples=6)
    steps = [int(s) for b in batches for s in b["step_index"]]
    trajectories = [int(i) for b in batches for i in b["trajectory"]]
    xs = torch.cat([b["x"] for b in batches])
    assert len(steps) == 6 and len(set(steps)) > 1
    for x, i, j in zip(xs, trajectories, steps, strict=True):
        state = dm.tensors["states"][i, j]
        torch.testing.assert_close(x, state / (sched.sigmas[j] ** 2 + 1) ** 0.5)
        assert not torch.allclose(x, state)


def _groups(num_trajectories: int = 8, steps: int = 6, n: int = 1) -> TrajectoryGroups:
    states = torch.randn(num_trajectories, steps + 1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    return TrajectoryGroups({"states": states, "timesteps": torch.arange(steps, 0, -1)}, group_size=n)


@pytest.mark.parametrize("m", [2, 4])
def test_mixed_start_batches_hold_distinct_starts_and_trajectories(m):
    groups = _groups()
    for batch in StartBatchSampler(groups, 8, num_batches=20, seed=1, starts_per_batch=m):
        pairs = [groups.index[i] for i in batch]
        assert len({i for i, _ in pairs}) == 8, "a trajectory appears twice in one batch"
        runs = [pairs[c * 8 // m:(c + 1) * 8 // m] for c in range(m)]
        starts = [{j for _, j in run} for run in runs]
        assert all(len(s) == 1 for s in starts), "a sub-batch mixes starts"
        assert len(set.union(*starts)) == m, "two sub-batches share a start"


def test_one_start_per_batch_is_the_default_sampler():
    groups = _groups()
    assert (list(StartBatchSampler(groups, 4, num_batches=6, seed=2, starts_per_batch=1))
            == list(StartBatchSampler(groups, 4, num_batches=6, seed=2)))


def test_mixed_start_batches_shard_like_one_process():
    groups = _groups()
    whole = list(StartBatchSampler(groups, 8, num_batches=5, seed=3, starts_per_batch=2))
    shards = [list(StartBatchSampler(groups, 4, num_batches=5, seed=3, num_replicas=2, rank=r, starts_per_batch=2))
              for r in (0, 1)]
    for b, (r0, r1) in enumerate(zip(*shards, strict=True)):
        assert sorted(r0 + r1) == sorted(whole[b])
        # each rank holds half of every start's sub-batch
        for rank_items in (r0, r1):
            assert [groups.index[i][1] for i in rank_items[::2]] == [groups.index[i][1] for i in whole[b][::4]]


def test_sampler_rejects_bad_starts_per_batch():
    with pytest.raises(ValueError, match="divide batch_size 4, got 3"):
        StartBatchSampler(_groups(), 4, num_batches=1, starts_per_batch=3)
    with pytest.raises(ValueError, match="starts_per_batch 8 exceeds the 6 group starts"):
        StartBatchSampler(_groups(), 8, num_batches=1, starts_per_batch=8)


def test_collate_by_start_splits_a_mixed_batch_into_single_start_batches():
    groups = _groups(n=2)
    single = collate_by_start([groups[i] for i in (0, 5, 10)])  # trajectories 0..2 at start 0
    assert isinstance(single, dict) and single["x"].shape == (3, 1, 2, 2)
    assert sub_batches(single) == [single]
    mixed = collate_by_start([groups[i] for i in (0, 5, 1, 6)])  # two items at start 0, two at start 1
    assert [b["step_index"].tolist() for b in sub_batches(mixed)] == [[0, 0], [1, 1]]
    assert torch.equal(mixed[1]["targets"][0], groups.states[0, 2:4])  # trajectory 0 from start 1


def test_an_epoch_can_draw_groups_of_its_own_size():
    groups, longer = _groups(n=1), _groups(n=3)
    plain = StartBatchSampler(groups, 4, num_batches=5, seed=4, starts_per_batch=2)
    mixed = StartBatchSampler(groups, 4, num_batches=5, seed=4, starts_per_batch=2, epoch_groups={1: longer})
    data = mixed.loader_dataset()
    assert len(data) == len(groups) + len(longer)
    first = list(plain)
    for epoch, expected_n in ((0, 1), (1, 3), (2, 1)):
        plain.set_epoch(epoch)
        mixed.set_epoch(epoch)
        batches = list(mixed)
        if expected_n == 1:  # every epoch draws the same batches (seeded by seed alone), its own groups aside
            assert batches == list(plain) == first
        for batch in batches:
            items = [data[i] for i in batch]
            assert all(len(item["timesteps"]) == expected_n for item in items)
            for item in items:  # every item is a real group of the epoch's size on its trajectory
                i, j = item["trajectory"], item["step_index"]
                assert torch.equal(item["x"], groups.states[i, j])
                assert torch.equal(item["target"], groups.states[i, j + expected_n])


def test_data_module_serves_the_group_sizes_of_an_epoch_plan(tiny_model_dir, tmp_path):
    dm = make_dm(tiny_model_dir, tmp_path, group_size=1)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.loader(EpochPlan(batches_per_epoch=3, group_sizes={2: 4, 1: 1}))
    for epoch, n in ((0, 1), (1, 1), (2, 4)):
        loader.batch_sampler.set_epoch(epoch)
        assert len(list(loader)) == 3
        for batch in loader:
            assert all(b["timesteps"].shape[1] == n for b in sub_batches(batch))
    with pytest.raises(ValueError, match="group_size 6 is larger than the schedule"):
        dm.loader(EpochPlan(group_sizes={2: 6}))
    with pytest.raises(ValueError, match="starts_per_batch 2 exceeds the 1 group starts"):
        make_dm(tiny_model_dir, tmp_path, starts_per_batch=2).check_group_size(5)


def test_data_module_reads_the_fp_model_and_plan_of_the_trainers_module(tiny_model_dir, tmp_path):
    # A module that describes its epochs (as BlockReconstruction does) is read, never writes into the data module.
    class Describes(L.LightningModule):
        def epoch_plan(self):
            return EpochPlan(pretrained=str(tiny_model_dir), batches_per_epoch=2)

    dm = make_dm(tiny_model_dir, tmp_path, pretrained=None)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(Describes())
    dm.trainer = trainer
    assert dm.model_path == str(tiny_model_dir)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataloader()) == 2
    assert "pretrained" not in dm.hparams  # unset: not a second value of the module's key in Lightning's merge


def test_data_module_refuses_another_fp_model_than_the_one_calibrated(tiny_model_dir, tmp_path):
    class Describes(L.LightningModule):
        def epoch_plan(self):
            return EpochPlan(pretrained="models/other")

    dm = make_dm(tiny_model_dir, tmp_path)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(Describes())
    dm.trainer = trainer
    with pytest.raises(ValueError, match="data.init_args.pretrained .* is not the model being calibrated"):
        _ = dm.model_path
