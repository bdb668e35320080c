"""The classifier judge against transformers itself, on a tiny random ResNet with ImageNet-style labels."""

import sys

import numpy as np
import pytest
import torch
from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

from esd_jax.errors import UserError
from esd_jax.judges.classifier import ClassifierJudge, match_label

# ImageNet's label style: synonyms after commas; six labels so that top-5 leaves one out.
LABELS = {
    0: "tench, Tinca tinca",
    1: "cassette player",
    2: "chain saw, chainsaw",
    3: "English springer, English springer spaniel",
    4: "gas pump, gasoline pump, petrol pump, island dispenser",
    5: "French horn, horn",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=len(LABELS)
    )
    config.id2label, config.label2id = LABELS, {v: k for k, v in LABELS.items()}
    path = tmp_path_factory.mktemp("resnet")
    ResNetForImageClassification(config).eval().save_pretrained(path)
    # resnet-50's processor: shortest edge to 32 / 0.875, then a centre crop of 32.
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    shapes = [(40, 48, 3), (64, 64, 3)] * 5
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]


def reference_ranking(folder, images) -> list[list[int]]:
    """Every label id per image, best first: the processor and the model called directly, one batch."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    return logits.argsort(dim=-1, descending=True).tolist()


def test_predictions_and_accuracy_match_transformers(folder, images):
    ranking = reference_ranking(folder, images)
    # Each image's class is its reference rank-1, rank-2 or last label (so top-1 and top-5 right, top-5
    # only, neither), named by its last synonym in capitals: matching ignores case and takes any synonym.
    ranks = [0, 1, len(LABELS) - 1]
    rows = [
        {"class": LABELS[order[ranks[i % 3]]].split(",")[-1].strip().upper(), "case_number": str(i)}
        for i, order in enumerate(ranking)
    ]
    judge = ClassifierJudge(str(folder), batch_size=4)  # batches of 4, 4 and 2
    records = judge.judge(images, rows)

    for i, (record, order) in enumerate(zip(records, ranking, strict=True)):
        assert record["class"] == rows[i]["class"]
        assert record["top1"] == LABELS[order[0]]
        assert record["top5"] == [LABELS[j] for j in order[:5]]
        assert record["correct1"] is (i % 3 == 0)
        assert record["correct5"] is (i % 3 != 2)

    erased = rows[0]["class"].lower()
    judge.concept = erased
    summary = judge.summary(records, rows)
    for cls in {row["class"] for row in rows}:
        group = [i for i, row in enumerate(rows) if row["class"] == cls]
        assert summary["per_class"][cls] == {
            "images": len(group),
            "top1": sum(i % 3 == 0 for i in group) / len(group),
            "top5": sum(i % 3 != 2 for i in group) / len(group),
        }
    mine = [i for i, row in enumerate(rows) if row["class"].lower() == erased]
    others = [i for i in range(len(rows)) if i not in mine]
    assert summary["erased"] == {
        "images": len(mine),
        "top1": sum(i % 3 == 0 for i in mine) / len(mine),
        "top5": sum(i % 3 != 2 for i in mine) / len(mine),
    }
    assert summary["others"] == {
        "images": len(others),
        "top1": sum(i % 3 == 0 for i in others) / len(others),
        "top5": sum(i % 3 != 2 for i in others) / len(others),
    }
    judge.concept = None
    pooled = judge.summary(records, rows)
    assert pooled["erased"] is None and pooled["others"]["images"] == len(rows)


def test_match_label_takes_any_synonym_case_aside():
    labels = {**LABELS, 6: "crane", 7: "crane"}  # ImageNet's bird and machine share a name
    assert match_label("tench", labels) == {0}
    assert match_label("  Tinca   TINCA ", labels) == {0}
    assert match_label("chainsaw", labels) == match_label("Chain Saw", labels) == {2}
    assert match_label("english springer", labels) == {3}
    assert match_label("horn", labels) == {5}
    assert match_label("crane", labels) == {6, 7}
    with pytest.raises(UserError) as e:
        match_label("springer", labels)  # part of a synonym is not a synonym
    assert "'springer'" in str(e.value) and "\n" not in str(e.value)


def test_bad_rows_are_one_line_errors(folder, images):
    judge = ClassifierJudge(str(folder))
    with pytest.raises(UserError, match="'zebra' names none") as e:
        judge.judge(images[:2], [{"class": "tench"}, {"class": "zebra"}])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no column 'class'"):
        judge.judge(images[:1], [{"prompt": "Image of tench"}])
    records = judge.judge(images[:1], [{"class": "tench"}])
    with pytest.raises(UserError, match="'golf ball' is none of the prompt file's classes"):
        ClassifierJudge(str(folder), concept="golf ball").summary(records, [{"class": "tench"}])


def test_missing_model_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        ClassifierJudge("esd-jax-tests/no-such-classifier")
    message = str(e.value)
    assert "'esd-jax-tests/no-such-classifier'" in message and "HF_HUB_OFFLINE" in message
    assert "download it once online or pass a local folder" in message and "\n" not in message
    with pytest.raises(UserError, match="no such folder, and not a hub id"):
        ClassifierJudge(str(tmp_path / "nowhere"))


def test_missing_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(UserError, match=r'pip install -e "\.\[eval\]"'):
        ClassifierJudge()


def test_a_csv_without_classes_is_refused_before_any_image_is_read(folder, tmp_path):
    from esd_jax.config import EvaluateConfig
    from esd_jax.judges.evaluate import judge_prompts

    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt,evaluation_seed\n0,a photo of a tench,1\n")
    (tmp_path / "empty").mkdir()  # no images at all: the class column is what it must refuse first
    cfg = EvaluateConfig(prompts=str(csv), judge="classifier", classifier=str(folder), images=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no column 'class'"):
        judge_prompts(cfg)
