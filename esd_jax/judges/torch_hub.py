"""What the LPIPS and FID judges need before torchmetrics builds a network: the packages, and the weight files
in torch's hub cache, each missing one a line saying what to install or which file to put where.

torchvision (LPIPS's AlexNet) and torch-fidelity (FID's Inception) download their weights into
`torch.hub.get_dir()/checkpoints` ($TORCH_HOME/hub/checkpoints; ~/.cache/torch/hub/checkpoints without it) the
first time a network is built, and from then on read the file there without checking its hash. Offline, that
first download fails deep in the library, or waits on a network that never answers; the judges look for the
files here first, so a run without them stops at once with the name and the folder.
"""

import contextlib
import importlib.util
import pickle
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from esd_jax.errors import UserError

EXTRA = 'pip install -e ".[lpips-fid]"'


def package_folder(judge: str, package: str) -> Path:
    """Where `package` is installed, found without importing it: torchmetrics imports torch-fidelity, and
    through it torchvision, which may not load (`load_torchvision` says why in one line)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the {judge} judge needs {package}: {EXTRA}")
    return Path(spec.submodule_search_locations[0])


def checkpoints() -> Path:
    """The folder torch.hub downloads weights into and reads them from (the environment is read at each call)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def require(path: Path, what: str, remedy: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} {path.name} is not in {path.parent}: {remedy}")
    return path


def require_download(judge: str, what: str, url: str) -> Path:
    """The cached file of `url`, as torch.hub names it; missing, where it goes and where it comes from."""
    folder = checkpoints()
    remedy = f"download {url} into that folder (TORCH_HOME moves it), or copy it there from a machine that has it"
    return require(folder / url.rsplit("/", 1)[-1], f"the {judge} judge: {what}", remedy)


@contextlib.contextmanager
def reading(judge: str, path: Path, url: str) -> Iterator[None]:
    """Around building the network: a file put there by hand that is not the download (cut short, another
    network's weights) is one line, not torch.load's or load_state_dict's traceback."""
    try:
        yield
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise UserError(f"the {judge} judge cannot load {path} ({first}): put the download of {url} there") from None


def load_torchvision(judge: str) -> None:
    """Imports torchvision. PyPI's torchvision is built against PyPI's CUDA torch: beside a +cpu torch its
    C++ operators do not load and the import fails with a RuntimeError, which is one line here."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise UserError(f"the {judge} judge needs torchvision: {EXTRA}") from None
    except (RuntimeError, OSError) as e:
        import torch

        try:
            built = version("torchvision")
        except PackageNotFoundError:
            built = "?"
        raise UserError(
            f"torchvision {built} does not load beside torch {torch.__version__} ({str(e).splitlines()[0]}); "
            "install the torchvision built for this torch (for a +cpu torch, PyTorch's CPU build)"
        ) from None
