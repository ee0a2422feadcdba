"""Hub model ids (diffusion/hub.py), offline: the test writes a huggingface_hub cache itself (the layout
``models--owner--name/{refs,snapshots}`` that ``snapshot_download`` reads) and turns the network off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from accuquant_pl.data.trajectories import TrajectoryDataModule
from accuquant_pl.diffusion import hub
from accuquant_pl.diffusion.hub import hub_reference, pinned, resolve_model_path, resolved_revision
from accuquant_pl.diffusion.loading import inspect_model_folder, load_denoiser, load_scheduler_config
from tests.conftest import tiny_unet
from tests.tiny_models import save_pipeline

MAIN = "a" * 40
V1 = "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline Hub cache holding acme/tiny-ddpm at two commits: main (UNet seed 0) and tag v1 (UNet seed 3)."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-ddpm"
    save_pipeline(repo / "snapshots" / MAIN, tiny_unet(seed=0))
    save_pipeline(repo / "snapshots" / V1, tiny_unet(seed=3))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named acme/...
    return cache


def test_hub_references_are_parsed_and_local_paths_are_not():
    assert hub_reference("google/ddpm-cifar10-32") is not None
    ref = hub_reference("acme/tiny-ddpm@v1:unet")
    assert (ref.repo_id, ref.revision, ref.subfolder) == ("acme/tiny-ddpm", "v1", "unet")
    assert str(ref) == "acme/tiny-ddpm@v1:unet"
    for local in ("./acme/tiny", "/abs/folder", "~/models/x", "models", "a/b/c"):
        assert hub_reference(local) is None, local


def test_a_local_folder_wins_over_an_id_of_the_same_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_pipeline(tmp_path / "models" / "digits", tiny_unet())
    assert hub_reference("models/digits") is None
    assert resolve_model_path("models/digits") == Path("models/digits")


def test_an_id_resolves_to_its_cached_snapshot_offline(hub_cache):
    repo = hub_cache / "models--acme--tiny-ddpm" / "snapshots"
    assert resolve_model_path("acme/tiny-ddpm") == repo / MAIN
    assert resolve_model_path("acme/tiny-ddpm@v1") == repo / V1
    assert resolve_model_path("acme/tiny-ddpm@v1:unet") == repo / V1 / "unet"
    assert resolved_revision("acme/tiny-ddpm@v1") == V1
    assert inspect_model_folder("acme/tiny-ddpm").denoiser_class_name == "UNet2DModel"
    assert load_scheduler_config("acme/tiny-ddpm")["_class_name"] == "DDPMScheduler"
    main, v1 = load_denoiser("acme/tiny-ddpm"), load_denoiser("acme/tiny-ddpm@v1")
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(main(x, 3).sample, tiny_unet(seed=0).eval()(x, 3).sample)
    assert not torch.equal(main(x, 3).sample, v1(x, 3).sample)


def test_unknown_ids_revisions_and_subfolders_fail_in_one_line_naming_them(hub_cache):
    cases = {"acme/not-there": "'acme/not-there' is not in the Hugging Face cache and cannot be downloaded",
             "acme/tiny-ddpm@v9": "'acme/tiny-ddpm@v9' is not in the Hugging Face cache",
             "acme/tiny-ddpm:nope": "has no subfolder 'nope'"}
    for spec, message in cases.items():
        with pytest.raises(FileNotFoundError, match=message) as err:
            load_denoiser(spec)
        assert "\n" not in str(err.value)


def test_the_trajectory_cache_key_records_the_resolved_revision(hub_cache, tmp_path):
    def key(teacher):
        return TrajectoryDataModule(pretrained=teacher, num_inference_steps=4, num_trajectories=2, batch_size=2,
                                    cache_dir=str(tmp_path / "trajectories")).cache_key()

    assert key("acme/tiny-ddpm")["model_revision"] == MAIN
    assert key("acme/tiny-ddpm@v1")["model_revision"] == V1
    local = save_pipeline(tmp_path / "local", tiny_unet())
    assert "model_revision" not in key(str(local))


def test_a_calibration_runs_from_a_hub_id_offline(hub_cache, tmp_path):
    from accuquant_pl.cli import main
    from accuquant_pl.deploy import load_quantized
    from tests.calibration.test_calibration_cli import tiny_args

    cli = main(tiny_args(tmp_path, "acme/tiny-ddpm@v1", "digits_w8a8_rtn.yaml"))
    assert cli.datamodule.cache_key()["model_revision"] == V1
    unet = load_quantized(tmp_path / "run" / "quantized")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(unet(x, 10).sample, cli.model.student(x, 10).sample)


def test_the_export_records_the_commit_it_was_calibrated_from(hub_cache, tmp_path):
    from accuquant_pl.cli import main
    from accuquant_pl.deploy.artifact import exported_pretrained
    from tests.calibration.test_calibration_cli import tiny_args

    assert pinned("acme/tiny-ddpm@v1:unet") == f"acme/tiny-ddpm@{V1}:unet"
    assert pinned(str(tmp_path)) == str(tmp_path)
    main(tiny_args(tmp_path, "acme/tiny-ddpm", "digits_w8a8_rtn.yaml"))
    recorded = exported_pretrained(tmp_path / "run" / "quantized")
    assert recorded == f"acme/tiny-ddpm@{MAIN}"
    # the branch moves on the Hub: the export still names the weights it was calibrated from
    (hub_cache / "models--acme--tiny-ddpm" / "refs" / "main").write_text(V1)
    hub._snapshot.cache_clear()  # a new process would read the moved ref
    assert resolve_model_path("acme/tiny-ddpm") == hub_cache / "models--acme--tiny-ddpm" / "snapshots" / V1
    assert resolve_model_path(recorded) == hub_cache / "models--acme--tiny-ddpm" / "snapshots" / MAIN


@pytest.mark.parametrize("error, spec, message", [
    ("RevisionNotFoundError", "acme/online@nope", "the Hub repository 'acme/online' has no revision 'nope'"),
    ("RepositoryNotFoundError", "acme/missing", "'acme/missing': no such Hub repository"),
    ("HfHubHTTPError", "acme/flaky", "'acme/flaky': the Hub download failed \\(HfHubHTTPError: 503 busy\\)"),
])
def test_online_failures_name_the_id_in_one_line(tmp_path, monkeypatch, error, spec, message):
    # What the Hub answers online, without a network: snapshot_download raises what huggingface_hub raises.
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub import errors

    def refuse(repo_id, **kwargs):
        status = 503 if error == "HfHubHTTPError" else 404
        response = SimpleNamespace(status_code=status, headers={}, request=None)  # what the errors read of it
        raise getattr(errors, error)(f"{status} busy\nmore detail", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=message) as err:
        resolve_model_path(spec, cache_dir=str(tmp_path / "hub"))
    assert "\n" not in str(err.value)


def test_a_resume_after_the_hub_branch_moved_is_refused_naming_both_commits(hub_cache, tmp_path):
    from accuquant_pl.cli import main
    from accuquant_pl.deploy.artifact import exported_pretrained
    from tests.calibration.test_calibration_cli import tiny_args

    args = tiny_args(tmp_path, "acme/tiny-ddpm", "digits_w8a8_qdiff.yaml")
    main(args)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (hub_cache / "models--acme--tiny-ddpm" / "refs" / "main").write_text(V1)
    hub._snapshot.cache_clear()  # a new process would read the moved ref
    with pytest.raises(ValueError, match=f"calibrated from 'acme/tiny-ddpm@{MAIN}', but 'acme/tiny-ddpm' now "
                                         f"resolves to 'acme/tiny-ddpm@{V1}'"):
        main([*args, "--ckpt_path", str(checkpoint)])
    # the export names the weights the units were calibrated on, not where the branch points now
    assert exported_pretrained(tmp_path / "run" / "quantized") == f"acme/tiny-ddpm@{MAIN}"
