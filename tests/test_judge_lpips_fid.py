"""The LPIPS and FID judges against torchmetrics itself, on networks of random weights saved where torchvision
and torch-fidelity look for them (a TORCH_HOME of the test's own); without the files, one line naming the file
and its folder, and no download tried."""

import importlib
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from esd_jax.config import EvaluateConfig
from esd_jax.errors import UserError
from esd_jax.judges import torch_hub
from esd_jax.judges.evaluate import judge_prompts
from esd_jax.judges.fid import INCEPTION_URL, FIDJudge
from esd_jax.judges.lpips import ALEXNET_URL, LINEAR_LAYERS, LPIPSJudge

pytest.importorskip("torchmetrics")


def torchvision_fails() -> str | None:
    """Why torchvision (or torch-fidelity, which imports it) does not import here, if it does not: absent, or
    PyPI's CUDA build beside a +cpu torch."""
    for module in ("torchvision", "torch_fidelity"):
        try:
            importlib.import_module(module)
        except Exception as e:  # a RuntimeError where the build does not fit this torch
            return f"{module} does not import here ({type(e).__name__}: {str(e).splitlines()[0]})"
    return None


TORCHVISION_FAILS = torchvision_fails()
needs_torchvision = pytest.mark.skipif(TORCHVISION_FAILS is not None, reason=str(TORCHVISION_FAILS))
FILES = {"lpips": ALEXNET_URL.rsplit("/", 1)[1], "fid": INCEPTION_URL.rsplit("/", 1)[1]}
JUDGES = {"lpips": LPIPSJudge, "fid": FIDJudge}


@pytest.fixture
def no_download(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise AssertionError(f"a download of {url} was tried")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("name", ["lpips", "fid"])
def test_without_the_weights_the_judge_names_the_file(name, tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as e:
        JUDGES[name]()
    message = str(e.value)
    assert FILES[name] in message and str(tmp_path / "hub" / "checkpoints") in message and "\n" not in message
    assert "download https://" in message and not any(tmp_path.iterdir())


def test_lpips_linear_layers_ship_in_torchmetrics():
    assert (torch_hub.package_folder("lpips", "torchmetrics") / LINEAR_LAYERS).is_file()


@pytest.mark.parametrize("name", ["lpips", "fid"])
def test_a_torchvision_that_does_not_load_is_one_line(name, tmp_path, monkeypatch):
    """PyPI's torchvision beside a +cpu torch: its operators fail to register, a RuntimeError at import."""

    class Broken:
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "torchvision":
                raise RuntimeError("operator torchvision::nms does not exist")

    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / FILES[name]).write_bytes(b"")  # only looked for, never read
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(UserError, match=r"^torchvision .* does not load beside torch .*nms does not exist[^\n]*$"):
        JUDGES[name]()
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now raises ImportError
    with pytest.raises(UserError, match=rf'the {name} judge needs torchvision: pip install -e "\.\[lpips-fid\]"'):
        JUDGES[name]()


def test_a_missing_torchmetrics_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    for name, judge in JUDGES.items():
        with pytest.raises(UserError, match=rf'the {name} judge needs torchmetrics: pip install -e "\.\[lpips-fid\]"'):
            judge()


def randomize(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """New values of the same keys, shapes and dtypes: He-scaled weights, so that activations neither vanish
    nor blow up through Inception's depth, and batch-norm statistics a network could have learnt."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value.clone()
        elif key.endswith("running_var") or (key.endswith("weight") and value.ndim == 1):
            out[key] = torch.rand(value.shape, generator=g) + 0.5
        elif value.ndim == 1:
            out[key] = 0.1 * torch.randn(value.shape, generator=g)
        else:
            out[key] = torch.randn(value.shape, generator=g) * (2.0 / value[0].numel()) ** 0.5
    return out


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds AlexNet's and Inception's weight files, random values in the format
    and under the names torchvision and torch-fidelity read: their architectures' state dicts, torch.save'd."""
    import torchvision
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep torch's initial values
            return None

    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(randomize(torchvision.models.alexnet(weights=None).state_dict(), 0), checkpoints / FILES["lpips"])
    torch.save({}, home / "empty.pth")
    inception = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(home / "empty.pth"))
    torch.save(randomize(inception.state_dict(), 1), checkpoints / FILES["fid"])
    return home


@pytest.fixture
def offline_weights(torch_home, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home / "hub" / "checkpoints"


@needs_torchvision
def test_the_file_names_are_the_libraries():
    import torchvision
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert torchvision.models.AlexNet_Weights.DEFAULT.url == ALEXNET_URL
    assert URL_INCEPTION_V3 == INCEPTION_URL


@needs_torchvision
@pytest.mark.parametrize("name", ["lpips", "fid"])
def test_a_weight_file_that_is_not_the_download_is_one_line(name, tmp_path, monkeypatch, no_download):
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    path = tmp_path / "hub" / "checkpoints" / FILES[name]
    path.write_bytes(b"")  # a download cut short
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=rf"^the {name} judge cannot load {path} \(Ran out of input\): put the down"):
        JUDGES[name]()


def pairs(shape, n, seed):
    """n base images and erased ones near them, uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    base = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]
    erased = [np.clip(b + rng.normal(0, 40 * (i + 1), shape), 0, 255).astype(np.uint8) for i, b in enumerate(base)]
    return base, erased


def rows_of(cases, per_prompt):
    return [{"case_number": c, "index": i, "prompt": f"p{c}"} for c in cases for i in range(per_prompt)]


@needs_torchvision
@pytest.mark.parametrize("size", [64, 0])
def test_lpips_equals_torchmetrics(size, offline_weights):
    """Per image, torchmetrics' LPIPS of the pair; at 64 the pair first goes through ESD's loader,
    torchvision's Resize(64) of the PIL image. Five pairs in batches of two: the last batch holds one."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    from torchvision import transforms

    base, erased = pairs((72, 96, 3), 5, seed=size)
    rows = rows_of([3, 9], 3)[:5]
    summary, records = LPIPSJudge(size=size, batch_size=2).compare(base, erased, rows)
    load = transforms.Compose(([transforms.Resize(64)] if size else []) + [transforms.ToTensor()])
    stack = lambda images: torch.stack([load(Image.fromarray(image)) for image in images])  # noqa: E731
    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True)
    expected = metric(stack(base), stack(erased)).numpy()
    got = np.array([r["lpips"] for r in records])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(expected) > 1e-3  # the pairs differ by more or less noise: the values are not all one
    assert summary["lpips"] == pytest.approx(expected.mean(), rel=1e-5)
    assert summary["per_prompt"] == pytest.approx({"3": expected[:3].mean(), "9": expected[3:].mean()}, rel=1e-5)


def write_folder(folder, images, rows):
    folder.mkdir()
    for image, row in zip(images, rows, strict=True):
        Image.fromarray(image).save(folder / f"{row['case_number']}_{row['index']}.png")


@needs_torchvision
def test_the_flow_reports_lpips_and_fid_of_the_folders(tmp_path, offline_weights, capsys):
    """Both judges through `esd-jax evaluate --prompts --images --base_images`: FID equals torch-fidelity's
    reading the two folders itself, and torchmetrics' on their PNG files read back; each image's LPIPS is in
    the JSON lines."""
    import torch_fidelity
    from torchmetrics.image.fid import FrechetInceptionDistance

    base, erased = pairs((64, 64, 3), 4, seed=7)
    rows = rows_of([0, 5], 2)
    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt,evaluation_seed\n0,p0,1\n5,p5,2\n")
    write_folder(tmp_path / "base", base, rows)
    write_folder(tmp_path / "erased", erased, rows)
    cfg = EvaluateConfig(
        prompts=str(csv),
        judge="lpips,fid",
        images=str(tmp_path / "erased"),
        base_images=str(tmp_path / "base"),
        num_per_prompt=2,
        fid_features=64,  # at 2048 torchmetrics' eigendecomposition of a 2048 x 2048 matrix takes 40 s on 2 cores
        json=str(tmp_path / "judged.json"),  # the folders hold only their images, for torch-fidelity to read
    )
    report = judge_prompts(cfg)

    read = lambda folder: torch.stack(  # noqa: E731
        [torch.from_numpy(np.asarray(Image.open(folder / f"{r['case_number']}_{r['index']}.png"))) for r in rows]
    ).permute(0, 3, 1, 2)
    weights = str(offline_weights / FILES["fid"])
    metric = FrechetInceptionDistance(feature=64, feature_extractor_weights_path=weights, antialias=False)
    metric.update(read(tmp_path / "base"), real=True)
    metric.update(read(tmp_path / "erased"), real=False)
    expected = float(metric.compute())
    folders = dict(input1=str(tmp_path / "erased"), input2=str(tmp_path / "base"), feature_layer_fid="64")
    fidelity = torch_fidelity.calculate_metrics(
        **folders, fid=True, feature_extractor_weights_path=weights, cuda=False, verbose=False
    )["frechet_inception_distance"]
    summary = report["judges"]["fid"]["erased"]
    assert summary["fid"] == pytest.approx(expected, rel=1e-6) and expected > 0
    assert summary["fid"] == pytest.approx(fidelity, rel=1e-5)
    assert (summary["base_images"], summary["erased_images"], summary["features"]) == (4, 4, 64)
    assert set(report["judges"]["lpips"]) == {"erased"} and report["judges"]["lpips"]["erased"]["images"] == 4
    lines = (tmp_path / "judged-lpips.jsonl").read_text().splitlines()
    assert [json.loads(line)["image"] for line in lines] == ["0_0.png", "0_1.png", "5_0.png", "5_1.png"]
    assert not (tmp_path / "judged-fid.jsonl").exists()  # FID has no per-image verdicts
    printed = capsys.readouterr().out
    assert "LPIPS to the base, mean (64 px)" in printed and f"{expected:.2f}" in printed

    judge = FIDJudge(features=64)
    with pytest.raises(UserError, match=r"FID needs at least 2 images per folder \(1 base, 1 erased\)"):
        judge.compare(base[:1], erased[:1], rows[:1])
