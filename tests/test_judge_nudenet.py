"""The NudeNet judge on drawn images, against nudenet's own detector reading the same images as PNG files."""

import json
import sys

import nudenet
import numpy as np
import pytest
from PIL import Image

from esd_jax.config import NUDENET_THRESHOLD
from esd_jax.errors import UserError
from esd_jax.judges.nudenet import EXPOSED, NudeNetJudge, chart

SKIN = (225, 175, 145)


def discs(height: int, width: int, background, radius: float, centres) -> np.ndarray:
    """Shaded skin-coloured discs on a plain background (radius and centres as fractions of the width):
    nudenet 3.4's 320n model reads two side by side as BUTTOCKS_EXPOSED, scoring smaller pairs higher."""
    yy, xx = np.mgrid[:height, :width] / width
    image = np.broadcast_to(np.asarray(background, np.float64), (height, width, 3))
    for cx, cy in centres:
        r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2  # [H, W]
        image = np.where((r2 < 1)[..., None], np.asarray(SKIN) * (1 - 0.45 * r2)[..., None], image)
    return image.clip(0, 255).astype(np.uint8)


def drawn() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:128, :160]
    return {
        "pair": discs(128, 128, (40, 40, 60), 0.2, [(0.32, 0.5), (0.68, 0.5)]),  # scores about 0.8
        "larger_pair": discs(256, 256, (40, 40, 60), 0.25, [(0.275, 0.5), (0.725, 0.5)]),  # about 0.5
        "pair_on_a_wide_canvas": discs(160, 224, (90, 120, 90), 0.15, [(0.36, 0.35), (0.64, 0.35)]),
        "noise": rng.integers(0, 256, (96, 128, 3), dtype=np.uint8),
        "gradient": np.stack([xx * 255 // 159, yy * 255 // 127, (xx + yy) % 256], axis=-1).astype(np.uint8),
        "shaded_skin": (np.asarray(SKIN) * (0.6 + 0.4 * np.cos((xx[..., None] - 80) / 100))).astype(np.uint8),
    }


BLANK = {
    name: np.full((128, 128, 3), colour, np.uint8)
    for name, colour in {"black": 0, "white": 255, "grey": 128, "skin": SKIN}.items()
}


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    return drawn()


@pytest.fixture(scope="module")
def from_files(images, tmp_path_factory) -> dict[str, list[dict]]:
    """nudenet's detections on each image saved as a PNG file, as the official scripts read them."""
    folder = tmp_path_factory.mktemp("nudenet")
    detector = nudenet.NudeDetector()
    found = {}
    for name, image in images.items():
        Image.fromarray(image).save(folder / f"{name}.png")
        found[name] = detector.detect(str(folder / f"{name}.png"))
    return found


@pytest.fixture(scope="module")
def everything() -> NudeNetJudge:
    return NudeNetJudge(threshold=0.0)


def rows_for(images) -> list[dict[str, str]]:
    return [{"prompt": name, "case_number": str(i)} for i, name in enumerate(images)]


def assert_same(detections: list[dict], expected: list[dict]) -> None:
    assert [d["class"] for d in detections] == [e["class"] for e in expected]
    assert [d["box"] for d in detections] == [e["box"] for e in expected]
    np.testing.assert_allclose([d["score"] for d in detections], [e["score"] for e in expected], atol=1e-5)


def test_exposed_classes_are_nudenets():
    labels = nudenet.nudenet.__labels
    assert set(EXPOSED) == {label for label in labels if label.endswith("_EXPOSED")}


def test_detections_equal_nudenet_on_png_files(images, from_files, everything):
    records = everything.judge(list(images.values()), rows_for(images))
    assert sum(len(found) for found in from_files.values()) >= 3  # the comparison is not vacuous
    for name, record in zip(images, records, strict=True):
        assert_same(record["detections"], from_files[name])
        exposed = {d["class"] for d in from_files[name]} & set(EXPOSED)
        assert record["exposed"] == sorted(exposed)
    json.dumps(records)


def test_the_threshold_keeps_scores_above_it(images, from_files):
    records = NudeNetJudge().judge(list(images.values()), rows_for(images))
    scores = [d["score"] for found in from_files.values() for d in found]
    assert any(s > NUDENET_THRESHOLD for s in scores) and any(s <= NUDENET_THRESHOLD for s in scores)
    for name, record in zip(images, records, strict=True):
        assert_same(record["detections"], [d for d in from_files[name] if d["score"] > NUDENET_THRESHOLD])
    assert "BUTTOCKS_EXPOSED" in records[list(images).index("pair")]["exposed"]


def test_blank_images_expose_nothing(everything):
    records = everything.judge(list(BLANK.values()), rows_for(BLANK))
    assert [r["exposed"] for r in records] == [[]] * len(BLANK)


def test_summary_counts_the_records(images, everything):
    records = everything.judge(list(images.values()) + list(BLANK.values()), rows_for({**images, **BLANK}))
    summary = everything.summary(records, rows_for({**images, **BLANK}))
    shows = [{d["class"] for d in r["detections"] if d["class"].endswith("_EXPOSED")} for r in records]
    assert summary["images"] == len(images) + len(BLANK)
    assert summary["any_exposed"] == sum(bool(s) for s in shows) > 0
    assert summary["any_exposed_share"] == pytest.approx(summary["any_exposed"] / summary["images"])
    assert summary["per_class"] == {c: sum(c in s for s in shows) for c in EXPOSED}
    assert summary["threshold"] == 0.0
    json.dumps(summary)


def test_chart_writes_a_png(images, everything, tmp_path):
    base = everything.summary(everything.judge(list(images.values()), rows_for(images)), rows_for(images))
    erased = everything.summary(everything.judge(list(BLANK.values()), rows_for(BLANK)), rows_for(BLANK))
    path = tmp_path / "nudenet.png"
    chart({"base": base, "erased": erased}, path)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.width > 300
    assert [p.name for p in tmp_path.iterdir()] == ["nudenet.png"]  # no temporary left behind


@pytest.mark.parametrize("module", ["nudenet", "onnxruntime"])
def test_a_missing_package_is_one_line(monkeypatch, module):
    for name in [m for m in sys.modules if m == "nudenet" or m.startswith("nudenet.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    with pytest.raises(UserError) as e:
        NudeNetJudge()
    message = str(e.value)
    assert "\n" not in message and module in message and 'pip install -e ".[eval]"' in message


def test_a_threshold_outside_0_1_is_refused():
    with pytest.raises(UserError, match="threshold"):
        NudeNetJudge(threshold=60)
