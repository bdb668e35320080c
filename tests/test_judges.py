"""`esd-jax evaluate --prompts`: sampling a prompt CSV for two models, judging folders, the report."""

import json

import numpy as np
import pytest
from PIL import Image
from test_evaluate import render

from esd_jax.cli import main
from esd_jax.config import EvaluateConfig
from esd_jax.errors import UserError
from esd_jax.judges.evaluate import judge_prompts
from esd_jax.toy import oracle


def write_csv(path, rows):
    lines = ["case_number,prompt,evaluation_seed,class"] + [f"{c},{p},{s},{k}" for c, p, s, k in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_judging_folders_counts_what_the_oracle_reads(tmp_path):
    """Folders made elsewhere (world images with known attributes): the toy judge's shares per folder are
    the oracle's readings counted here, and every image's verdict is in the JSON lines beside the report."""
    csv = write_csv(tmp_path / "p.csv", [(0, "a red circle", 1, "x"), (7, "a green square", 2, "y")])
    attributes = [{"colour": "red"}, {"colour": "red"}, {"colour": "green"}, {"colour": "green"}]
    for folder, seed in (("base", 0), ("erased", 1)):
        images, _ = render(attributes, seed)
        (tmp_path / folder).mkdir()
        for image, name in zip(images, ["0_0", "0_1", "7_0", "7_1"], strict=True):
            Image.fromarray(image).save(tmp_path / folder / f"{name}.png")
    cfg = EvaluateConfig(
        prompts=str(csv),
        judge="toy",
        images=str(tmp_path / "erased"),
        base_images=str(tmp_path / "base"),
        num_per_prompt=2,
        concept="red",
    )
    report = judge_prompts(cfg)
    for folder in ("base", "erased"):
        images = [np.asarray(Image.open(tmp_path / folder / f"{n}.png")) for n in ["0_0", "0_1", "7_0", "7_1"]]
        read = oracle.read(np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1)
        summary = report["judges"]["toy"][folder]
        assert summary["images"] == 4
        assert summary["concept_rate"] == pytest.approx(np.mean(read.colour == "red"))
        assert summary["shape"]["circle"] == pytest.approx(np.mean(read.shape == "circle"))
    saved = json.loads((tmp_path / "erased" / "judged.json").read_text())
    assert saved["judges"] == report["judges"] and saved["images_per_folder"] == 4
    lines = [json.loads(line) for line in (tmp_path / "erased" / "judged-toy.jsonl").read_text().splitlines()]
    assert [(r["folder"], r["image"]) for r in lines][:2] == [("base", "0_0.png"), ("base", "0_1.png")]
    assert len(lines) == 8 and {"colour", "shape", "style"} <= lines[0].keys()
    grid = Image.open(tmp_path / "erased" / "judged.png")  # two prompts' rows of 2 + 2 images of 32 px
    assert grid.size[0] >= 4 * 32 and grid.size[1] >= 2 * 32


def test_the_cli_samples_both_models_then_judges(tmp_path, capsys):
    """The toy model and an erased copy (a delta of its own weights, perturbed): both sampled into --out
    from the CSV's seeds, as `esd-jax sample --compare` does, then judged; the table shows both."""
    from safetensors.numpy import save_file

    from esd_jax import weights
    from esd_jax.partition import trainable_keys
    from esd_jax.pipeline import load_pipeline

    pipe = load_pipeline("toy")
    keys = sorted(trainable_keys(pipe.unet, "esd-x-strict"))[:2]
    delta = {k: v + 0.5 for k, v in weights.state_dict(pipe.unet, set(keys)).items()}
    save_file(delta, tmp_path / "delta.safetensors")
    csv = write_csv(tmp_path / "p.csv", [(3, "a red circle", 5, "x")])
    out = tmp_path / "out"
    args = ["--prompts", str(csv), "--judge", "toy", "--esd", str(tmp_path / "delta.safetensors")]
    assert main(["esd-jax", "evaluate", *args, "--out", str(out), "--steps", "4", "--concept", "red"]) == 0
    assert (out / "base" / "3_0.png").is_file() and (out / "3_0.png").is_file()
    report = json.loads((out / "judged.json").read_text())
    assert set(report["judges"]["toy"]) == {"base", "erased"}
    printed = capsys.readouterr().out
    assert "shows the concept" in printed and "base" in printed and "erased" in printed


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(judge="toy"), "--judge needs --prompts"),
        (dict(prompts="p.csv"), "--judge None: give one or several"),
        (dict(prompts="p.csv", judge="nudenet,kid"), "give one or several (comma-separated) of nudenet"),
        (dict(prompts="p.csv", judge="toy"), "give --out FOLDER (sample there) or --images FOLDER"),
        (dict(prompts="p.csv", judge="toy", out="o", base_images="b"), "--base_images goes with --images"),
        (dict(prompts="p.csv", judge="toy", images="i", esd="d"), "leave out --model, --workdir and --esd"),
        (dict(prompts="p.csv", judge="nudenet", images="i", threshold=1.5), "--threshold 1.5"),
        (dict(prompts="p.csv", judge="toy,lpips", images="i"), "--judge lpips compares the erased images to the base"),
        (dict(prompts="p.csv", judge="fid", out="o"), "give the erased model (--workdir or --esd) to sample both"),
        (dict(prompts="p.csv", judge="lpips", images="i", base_images="b", lpips_size=16), "--lpips_size 16: give 0"),
        (dict(prompts="p.csv", judge="fid", images="i", base_images="b", fid_features=100), "--fid_features 100"),
    ],
)
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EvaluateConfig(**settings).validate()


def test_a_folder_missing_images_and_a_foreign_report_are_refused(tmp_path):
    csv = write_csv(tmp_path / "p.csv", [(0, "a red circle", 1, "x")])
    (tmp_path / "imgs").mkdir()
    cfg = EvaluateConfig(prompts=str(csv), judge="toy", images=str(tmp_path / "imgs"), num_per_prompt=2)
    with pytest.raises(UserError, match="lacks 2 of the prompt CSV's images \\(0_0.png, 0_1.png\\)"):
        judge_prompts(cfg)
    (tmp_path / "imgs" / "judged.json").write_text('{"mine": 1}')
    with pytest.raises(UserError, match="judged.json is not a report of esd-jax evaluate"):
        judge_prompts(cfg)


def test_nudenet_judges_folders_and_draws_its_chart(tmp_path):
    """The real detector through the flow: uniform images show no exposed part in either folder, the
    report says so per class, and the chart of both folders is written beside it."""
    pytest.importorskip("nudenet")
    csv = write_csv(tmp_path / "p.csv", [(0, "a photo", 1, "x")])
    for folder, colour in (("base", (200, 150, 120)), ("erased", (30, 30, 30))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (64, 64), colour).save(tmp_path / folder / "0_0.png")
    cfg = EvaluateConfig(
        prompts=str(csv), judge="nudenet", images=str(tmp_path / "erased"), base_images=str(tmp_path / "base")
    )
    report = judge_prompts(cfg)
    for summary in report["judges"]["nudenet"].values():
        assert summary["images"] == 1 and summary["any_exposed"] == 0 and not any(summary["per_class"].values())
    assert (tmp_path / "erased" / "judged-nudenet.png").read_bytes()[:4] == b"\x89PNG"


def test_each_judge_says_whether_an_image_shows_the_concept():
    """`shows`, what `esd-jax attack` counts, reads the verdict each judge writes for an image."""
    from esd_jax.judges.classifier import ClassifierJudge
    from esd_jax.judges.clip import CLIPJudge
    from esd_jax.judges.nudenet import NudeNetJudge
    from esd_jax.toy.judge import ToyJudge

    toy = ToyJudge(concept="red")
    assert toy.shows({"colour": "red", "shape": "circle", "style": "plain"})
    assert not toy.shows({"colour": "blue", "shape": "circle", "style": "plain"})
    # The others' verdicts need no model to read: their `shows` uses only the record.
    assert NudeNetJudge.shows(None, {"exposed": ["FEMALE_BREAST_EXPOSED"]})
    assert not NudeNetJudge.shows(None, {"exposed": []})
    assert ClassifierJudge.shows(None, {"correct1": True}) and not ClassifierJudge.shows(None, {"correct1": False})
    assert CLIPJudge.shows(None, {"shows_concept": True}) and not CLIPJudge.shows(None, {"shows_concept": False})
