"""The adversarial prompt search and `esd-jax attack`, on the embedded toy model."""

import csv
import json

import jax
import numpy as np
import pytest
from PIL import Image

from esd_jax import conditioning, weights
from esd_jax.attack.folder import FOLDERS, typed_prompt
from esd_jax.attack.search import Attacker, nearest_tokens
from esd_jax.cli import main
from esd_jax.partition import trainable_keys
from esd_jax.pipeline import load_pipeline
from esd_jax.run import write_delta
from esd_jax.sampling.sampler import Item, Sampler
from esd_jax.schedulers import NoiseSchedule
from esd_jax.toy import oracle

TOKENS = 3


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy")


@pytest.fixture(scope="module")
def erased_delta(toy, tmp_path_factory):
    """A stand-in for an erased toy model: its cross-attention keys and values scaled down, which weakens
    what every prompt says."""
    state = weights.state_dict(toy.unet)
    delta = {k: np.asarray(state[k]) * 0.5 for k in trainable_keys(toy.unet, "esd-x-strict")}
    path = tmp_path_factory.mktemp("erased") / "erased.safetensors"
    write_delta(delta, path)
    return path


def token_ids(toy, text: str) -> list[int]:
    return toy.tokenizer(text, add_special_tokens=False).input_ids


def test_a_prefix_of_token_embeddings_encodes_as_those_tokens(toy):
    """The prefix replaces the slots' embeddings: real tokens' embeddings there give the prompt with them."""
    table = np.asarray(toy.text_encoder.text_model.embeddings.token_embedding.weight[...])
    ids = toy.prompt_ids(["a red circle"])[0]
    prefix = table[token_ids(toy, "green square blue")][None]  # [1, 3, D]
    got = toy.text_encoder(conditioning.with_slots(ids, TOKENS), prefix)
    want = toy.text_encoder(toy.prompt_ids(["green square blue a red circle"])[0])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_slots_fit_only_where_the_end_token_survives(toy):
    ids = toy.prompt_ids(["a red circle", "a red circle, striped red red red red red red red"])[0]
    eos = toy.tokenizer.eos_token_id
    assert conditioning.slots_fit(ids, TOKENS, eos).tolist() == [True, False]
    slotted = conditioning.with_slots(ids, TOKENS)
    assert slotted.shape == ids.shape
    np.testing.assert_array_equal(slotted[0, 1 + TOKENS : 1 + TOKENS + 4], ids[0, 1:5])


def test_the_sampler_reads_a_prefix_as_the_tokens_it_embeds(toy):
    table = np.asarray(toy.text_encoder.text_model.embeddings.token_embedding.weight[...])
    sampler = Sampler(toy, steps=4, guidance=4.0, batch_size=4)
    items = [Item("a red circle", seed, 0) for seed in range(4)]
    prefix = np.repeat(table[token_ids(toy, "green square blue")][None], 4, axis=0)
    with_prefix = next(sampler.batches(items, prefix=prefix, gather=True))[1]
    typed = next(sampler.batches([Item("green square blue a red circle", s, 0) for s in range(4)], gather=True))[1]
    np.testing.assert_allclose(with_prefix, typed, atol=1e-5)


def test_nearest_tokens_is_the_largest_cosine_among_the_allowed():
    rng = np.random.default_rng(0)
    table, prefix = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(3, 4, 8)).astype(np.float32)
    allowed = np.ones(50, bool)
    allowed[[7, 20]] = False
    cosine = (prefix / np.linalg.norm(prefix, axis=-1, keepdims=True)) @ (
        table / np.linalg.norm(table, axis=-1, keepdims=True)
    ).T
    cosine[..., ~allowed] = -np.inf
    np.testing.assert_array_equal(np.asarray(nearest_tokens(prefix, table, allowed)), cosine.argmax(-1))


@pytest.fixture(scope="module")
def searched(toy, erased_delta):
    """Both attackers against the stand-in erasure on four images of "a red circle" from the base model."""
    from esd_jax.run import apply_delta

    base = Sampler(toy, steps=8, guidance=4.0, batch_size=4)
    items = [Item("a red circle", seed, 0) for seed in range(4)]
    _, _, z0 = next(base.batches(items, gather=True))
    erased = load_pipeline("toy")
    apply_delta(erased, erased_delta)
    sampler = Sampler(erased, steps=8, guidance=4.0, batch_size=4)
    tokenizer = erased.tokenizer
    schedule = NoiseSchedule.from_config(erased.scheduler_config)
    attacker = Attacker(sampler, schedule, erased.text_encoder.config.vocab_size, tokenizer.all_special_ids)
    plain = erased.prompt_ids([i.prompt for i in items])[0]
    slotted = conditioning.with_slots(plain, TOKENS)
    rows = np.arange(4, dtype=np.int32)
    key = jax.random.key_data(jax.random.key(7))
    slotted, z0, rows = (sampler.sharded(x) for x in (slotted, z0, rows))
    out = {"attacker": attacker, "plain": plain, "slotted": slotted, "z0": z0, "rows": rows, "key": key}
    for name in ("embedding", "token"):
        settings = attacker.settings(name, TOKENS, 20, 0.01, 2)
        out[name] = attacker.search(settings, slotted, z0, rows, key)
        out[f"{name}_settings"] = settings
    out["tokenizer"] = tokenizer
    return out


@pytest.mark.slow
def test_the_embedding_attack_lowers_the_erased_models_loss_on_concept_images(searched):
    attacker, evaluation = searched["attacker"], searched["attacker"].settings("embedding", TOKENS, 1, 0.01, 32)
    args = (searched["z0"], searched["rows"], searched["key"])
    plain = np.asarray(attacker.losses(evaluation, searched["plain"], None, *args))
    prefix = searched["embedding"][0]
    attacked = np.asarray(attacker.losses(evaluation, searched["slotted"], prefix, *args))
    # On the same 32 noisings per image (the search's own curve, 2 random noisings a step, is too noisy to read).
    assert (attacked < plain).all(), (attacked, plain)
    curve = np.asarray(searched["embedding"][2])
    assert curve.shape == (4, 20)


@pytest.mark.slow
def test_the_search_is_deterministic_from_its_seed(searched):
    attacker = searched["attacker"]
    again = attacker.search(
        searched["embedding_settings"], searched["slotted"], searched["z0"], searched["rows"], searched["key"]
    )
    np.testing.assert_allclose(np.asarray(again[0]), np.asarray(searched["embedding"][0]), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_the_token_attack_gives_vocabulary_tokens_and_a_prompt_that_types_them(searched):
    tokenizer = searched["tokenizer"]
    tokens = np.asarray(searched["token"][1])
    assert tokens.shape == (4, TOKENS)
    assert ((tokens >= 0) & (tokens < len(tokenizer))).all()
    assert not set(tokens.ravel().tolist()) & set(tokenizer.all_special_ids)
    for row in tokens:
        text = typed_prompt(tokenizer, row, "a red circle")
        assert text.endswith("red circle")


def recount(folder, names: list[str], concept: str) -> float:
    """The share of images the oracle reads as `concept`, from the PNG files: a count of its own."""
    pixels = np.stack([np.asarray(Image.open(folder / n).convert("RGB")) for n in names]).astype(np.float32)
    reading = oracle.read(pixels.transpose(0, 3, 1, 2) / 127.5 - 1)
    return float(np.mean(reading.colour == concept))


def attack_args(erased_delta, out) -> list[str]:
    return [
        "esd-jax", "attack", "--model", "toy", "--esd", str(erased_delta), "--concept", "red", "--out", str(out),
        "--num_per_prompt", "1", "--attack_steps", "3", "--draws", "1", "--steps", "5", "--batch_size", "8",
        "--tokens", str(TOKENS), "--seed", "0",
    ]  # fmt: skip


@pytest.mark.slow
def test_attack_cli_writes_folders_a_report_that_recounts_and_resumes(erased_delta, tmp_path, capsys):
    out = tmp_path / "attack"
    args = attack_args(erased_delta, out)
    assert main(args) == 0
    report = json.loads((out / "attack.json").read_text())
    assert report["attacks"] == 7  # the toy world's seven prompts that name red
    names = [r["image"] for r in report["records"]]
    for folder in FOLDERS:
        assert report["success_rate"][folder] == pytest.approx(recount(out / folder, names, "red"))
    assert report["success_rate"]["base"] > 0.8
    with open(out / "attack-prompts.csv", newline="") as f:
        prompts = list(csv.DictReader(f))
    assert [p["prompt"] for p in prompts] == [r["token_prompt"] for r in report["records"]]
    assert all(
        len(r["embedding_curve"]) == 3 and set(r["loss"]) == {"plain", "embedding", "token"} for r in report["records"]
    )
    for picture in ("attack.png", "attack-loss.png"):
        assert Image.open(out / picture).size[0] > 200

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p.parent != out}
    capsys.readouterr()
    assert main(args) == 0
    assert "continuing, 7 attacks already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in written} == written


@pytest.mark.slow
def test_an_attack_with_other_settings_starts_over(erased_delta, tmp_path, capsys):
    out = tmp_path / "attack"
    args = attack_args(erased_delta, out)
    assert main(args) == 0
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p.parent != out}
    capsys.readouterr()
    assert main([*args[:-2], "--seed", "1"]) == 0  # other settings: every attack again
    assert "made with other settings; starting over" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns != t for p, t in written.items() if p.parent.name in ("embedding", "token"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--esd", "missing.safetensors"], "--esd missing.safetensors: no such file"),
        ([], "give the erased model to attack"),
        (["--esd", "ERASED", "--tokens", "14"], "leaves no room for 14 prefix tokens"),
        (["--esd", "ERASED", "--attack_lr", "0"], "--attack_lr 0.0: give a positive finite learning rate"),
    ],
)
def test_bad_attack_input_is_one_line(erased_delta, tmp_path, capsys, extra, message):
    extra = [str(erased_delta) if e == "ERASED" else e for e in extra]
    assert main(["esd-jax", "attack", "--model", "toy", "--concept", "red", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_clip_judge_needs_the_concept(erased_delta, tmp_path, capsys):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,evaluation_seed,case_number\na red circle,0,0\n")
    args = ["--model", "toy", "--esd", str(erased_delta), "--prompts", str(prompts), "--judge", "clip"]
    assert main(["esd-jax", "attack", *args, "--out", str(tmp_path / "o")]) == 2
    assert "--judge clip needs --concept TEXT" in capsys.readouterr().err


def test_a_folder_of_other_files_is_not_an_attacks(erased_delta, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["esd-jax", "attack", "--esd", str(erased_delta), "--concept", "red", "--out", str(tmp_path)]) == 2
    assert "holds files that are not an attack's" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"
