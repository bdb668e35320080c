"""A model named by a local folder or a Hugging Face hub id, as a folder on this machine.

Every model esd-jax reads (pipelines, the judges' classifier and CLIP) is found the same way: a folder is
taken as it is; a hub id is the snapshot in huggingface_hub's cache (downloaded when the hub can be
reached; `HF_HUB_OFFLINE=1` honoured), holding only the files its reader needs. What can go wrong is one
line naming the model.
"""

import os
from pathlib import Path

from esd_jax.errors import UserError


def local_folder(model: str | os.PathLike, patterns: list[str], what: str, example: str) -> Path:
    """The folder of `model` (`what` names it in messages: "model", "classifier", ...; `example` is a hub id
    of its kind), its hub snapshot limited to the files matching `patterns`."""
    name = str(model)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {name!r} is a file; pass a folder or a hub id like {example}")
        return path
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise UserError(f"{what} {name!r}: no such folder, and not a hub id like {example}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise UserError(
            f"{what} {name!r} is not in the Hugging Face cache and the hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1); download it once online or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{what} {name!r}: no such repository on the hub (or it is private: log in with `hf auth login`)"
        ) from None
    except HfHubHTTPError as e:
        raise UserError(f"{what} {name!r}: the hub refused the download ({str(e).splitlines()[0]})") from None
