"""`esd-jax evaluate`'s measurement: prompt groups, rates and accuracies against the world's own labels."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from esd_jax import weights
from esd_jax.cli import main
from esd_jax.config import EvaluateConfig
from esd_jax.errors import UserError
from esd_jax.partition import trainable_keys
from esd_jax.pipeline import load_pipeline
from esd_jax.run import write_delta
from esd_jax.sampling.record import mark
from esd_jax.toy import evaluate as ev
from esd_jax.toy import world

INDEX = {"colour": world.COLOURS, "shape": world.SHAPES, "style": world.STYLES}


def render(attributes: list[dict[str, str]], seed: int) -> np.ndarray:
    """World images (uint8 [N, H, W, 3]) with the given attributes, the rest random."""
    rng = np.random.default_rng(seed)
    n = len(attributes)
    labels = {
        a: np.array([values.index(x[a]) if a in x else rng.integers(len(values)) for x in attributes])
        for a, values in INDEX.items()
    }
    side = rng.uniform(world.MIN_SIDE, world.MAX_SIDE, n).astype(np.float32)
    low, high = side / 2 + world.MARGIN, world.SIZE - side / 2 - world.MARGIN
    cx, cy = (
        (low + (high - low) * rng.random(n)).astype(np.float32),
        (low + (high - low) * rng.random(n)).astype(np.float32),
    )
    images = world.render(
        labels["colour"], labels["shape"], labels["style"], cx, cy, side, rng.integers(6, size=(n, 2))
    )
    return np.round((images.transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8), labels


@pytest.mark.parametrize("concept", ["red", "circle", "striped"])
def test_prompt_groups(concept):
    parsed = ev.parse_concept(concept)
    prompts = ev.prompts_for(parsed)
    for p in prompts:
        names = dict(p.names)
        if p.group == "unnamed":
            assert parsed.attribute not in names and concept not in p.text.split()
        else:
            assert (names[parsed.attribute] == concept) == (p.group == "concept")
            assert names[parsed.attribute] in p.text.replace(",", "").split()
    values = INDEX[parsed.attribute]
    assert {dict(p.names)[parsed.attribute] for p in prompts if p.group != "unnamed"} == set(values)
    assert len({p.text for p in prompts}) == len(prompts)


def test_measure_against_the_world_labels():
    """Images drawn as the prompts ask give rate 1 and accuracy 1; repainting red as blue gives rate 0 with
    the shapes intact; on unnamed prompts the red rate is the drawn share of red."""
    concept = ev.parse_concept("red")
    prompts = ev.prompts_for(concept)
    per = 6
    wanted = [dict(p.names) for p in prompts for _ in range(per)]
    images, labels = render(wanted, seed=0)
    images = images.reshape(len(prompts), per, *images.shape[1:])
    m = ev.measure(concept, prompts, images)
    assert m["groups"]["concept"]["concept_rate"] == 1.0
    assert m["groups"]["concept"]["accuracy"]["shape"] == 1.0
    assert m["groups"]["others"]["accuracy"] == {"colour": 1.0, "shape": 1.0}
    unnamed = np.array([p.group == "unnamed" for p in prompts]).repeat(per)
    assert m["groups"]["unnamed"]["concept_rate"] == pytest.approx(np.mean(labels["colour"][unnamed] == 0))
    assert m["prompts"]["a red square"] == {
        "images": per,
        "concept_rate": 1.0,
        "accuracy": {"colour": 1.0, "shape": 1.0},
    }

    repainted = [{**w, "colour": "blue"} if w.get("colour") == "red" else w for w in wanted]
    erased, _ = render(repainted, seed=0)
    erased = erased.reshape(images.shape)
    e = ev.measure(concept, prompts, erased)
    assert e["groups"]["concept"]["concept_rate"] == 0.0 and e["groups"]["concept"]["accuracy"]["shape"] == 1.0
    assert e["groups"]["others"]["accuracy"]["colour"] == 1.0

    report = ev.report(concept, prompts, EvaluateConfig(num_per_prompt=per), {"base": m, "erased": e})
    assert (report["concept_rate_base"], report["concept_rate_erased"]) == (1.0, 0.0)
    assert (report["others_accuracy_base"], report["others_accuracy_erased"]) == (1.0, 1.0)
    json.dumps(report)
    text = ev.table(report)
    assert "prompts naming red (7)" in text and "other colours' prompts (21)" in text
    assert text.splitlines()[2].split()[-2:] == ["1.00", "0.00"]


def test_run_concept_is_the_word_every_prompt_names():
    class Run:
        concepts = ["red", "a red circle", "a square, red"]

    assert ev.run_concept(Run) == "red"
    for concepts in (["a red circle"], ["red", "a green square"]):  # two words; none
        Run.concepts = concepts
        with pytest.raises(UserError, match="give --concept"):
            ev.run_concept(Run)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--concept", "purple"], "concept 'purple' is not a concept of the toy world"),
        (["--concept", "red", "--workdir", "w", "--esd", "e"], "give either --workdir"),
        (["--concept", "red", "--esd", "missing.safetensors"], "--esd missing.safetensors: no such file"),
        (["--concept", "red", "--num_per_prompt", "0"], "--num_per_prompt must be at least 1"),
    ],
)
def test_cli_errors(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["esd-jax", "evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def resized(folder: Path, tmp_path: Path, sample_size: int) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": sample_size}))
    return copy


@pytest.mark.parametrize(
    "sample_size, message",
    [
        # The tiny test pipeline makes 16 px images (8 latents, a 2-level VAE): the oracle reads 32.
        (8, f"evaluate judges only the toy world's {world.SIZE} px RGB (3-channel) images, and this model makes 16 px"),
        # At 32 px, its tokenizer still lacks 'yellow'.
        (16, "the model's tokenizer does not know the word"),
    ],
)
def test_cli_refuses_a_model_outside_the_world(sd1_folder, tmp_path, capsys, sample_size, message):
    """Before the erased model loads (a damaged delta would be the error otherwise) or anything is sampled."""
    delta = tmp_path / "delta.safetensors"
    delta.write_bytes(b"not safetensors")
    model = resized(sd1_folder, tmp_path, sample_size)
    grid = tmp_path / "g.png"
    args = ["--model", str(model), "--concept", "red", "--esd", str(delta), "--grid", str(grid)]
    assert main(["esd-jax", "evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "--model toy" in err and err.count("\n") == 1
    assert not grid.exists()


def test_the_oracle_reads_only_rgb_images():
    """A model of the world's size but not 3 channels (the VAE's out_channels) is refused too."""

    class Pipe:
        native_resolution = world.SIZE
        vae = SimpleNamespace(config=SimpleNamespace(out_channels=1))

    with pytest.raises(UserError, match=f"this model makes {world.SIZE} px 1-channel images"):
        ev.check_images(Pipe)


def user_png(path: Path) -> None:
    Image.new("RGB", (4, 4), "blue").save(path)


@pytest.mark.parametrize(
    "flag,name,make,message",
    [
        ("--json", "run/config.json", lambda p: p.write_text('{"model": "toy"}'), "not made by esd-jax evaluate"),
        ("--grid", "run/esd-red.safetensors", lambda p: p.write_bytes(b"weights"), "not made by esd-jax evaluate"),
        ("--grid", "mine.png", user_png, "not made by esd-jax evaluate; move it away or pass another --grid"),
        # Another command's mark is not evaluate's.
        ("--grid", "s.png", lambda p: Image.new("RGB", (4, 4)).save(p, pnginfo=mark("esd-jax sample")), "not made by"),
        ("--grid", "pics", lambda p: p.mkdir(), "is a folder; pass a file name, such as {path}/evaluate-red.png"),
        ("--json", "file/r.json", None, "cannot write"),
        ("--grid", "/proc/esd-jax/g.png", None, "cannot write"),
        ("--json", "evaluate-red.png", None, "is also the picture (--grid); pass another --json"),
        (None, "evaluate-red.png", user_png, "--grid evaluate-red.png: not made by esd-jax evaluate"),  # the default
    ],
)
def test_outputs_evaluate_may_not_write_are_refused_before_loading(
    tmp_path, capsys, monkeypatch, flag, name, make, message
):
    """Checked before the model loads (--model nowhere would be the error otherwise); nothing is changed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "file").write_text("a file")
    path = Path(name)
    if make is not None:
        make(path)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    args = ["--model", "nowhere", "--concept", "red", *([flag, name] if flag else [])]
    assert main(["esd-jax", "evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(path=name) in err and err.count("\n") == 1, err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()} == before


def test_evaluate_replaces_its_own_outputs_and_marks_them(tmp_path, capsys):
    """A picture and a report evaluate wrote before are replaced; a --batch_size far above the images is
    capped to them."""
    grid, report = tmp_path / "g.png", tmp_path / "r.json"
    Image.new("RGB", (4, 4)).save(grid, pnginfo=mark(ev.MADE_BY))
    ev.write_json(report, {"concept": "blue"})
    args = ["--model", "toy", "--concept", "red", "--num_per_prompt", "1", "--steps", "1", "--batch_size", "100000"]
    assert main(["esd-jax", "evaluate", *args, "--grid", str(grid), "--json", str(report)]) == 0
    written = json.loads(report.read_text())
    assert (written["made_by"], written["concept"], written["settings"]["num_per_prompt"]) == (ev.MADE_BY, "red", 1)
    with Image.open(grid) as image:
        assert image.info["Software"] == ev.MADE_BY and image.width > 4


def test_a_delta_with_non_finite_weights_is_refused(tmp_path, capsys):
    pipe = load_pipeline("toy")
    key = sorted(trainable_keys(pipe.unet, "esd-x"))[0]
    value = weights.state_dict(pipe.unet, {key})[key]
    write_delta({key: np.full_like(value, np.nan)}, tmp_path / "nan.safetensors")
    grid = tmp_path / "g.png"
    args = ["--model", "toy", "--concept", "red", "--esd", str(tmp_path / "nan.safetensors"), "--grid", str(grid)]
    assert main(["esd-jax", "evaluate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "non-finite" in err and err.count("\n") == 1
    assert not grid.exists()
