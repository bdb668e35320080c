"""`sample.json` in every folder of images `esd-jax sample` writes: what made each image.

A resumed job keeps an image only if its record says it was made from the inputs it would be made
from now: the folder's settings (the model and its files, erased weights, steps, guidance, scheduler,
resolution, dtype), which all its images share, and the image's own (prompt, seed, index).
Every PNG esd-jax writes also carries its maker in a text chunk (`mark`), so that a file it did not
write, such as the user's own image under a name a job would use, is never replaced (`made_by`).
"""

import datetime
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from esd_jax.errors import UserError
from esd_jax.files import atomic_file

RECORD = "sample.json"
# The settings all images of a folder share, in the order a refusal names them. `model_files` and
# `checkpoint_files` are esd_jax.files.fingerprint's [path, size, mtime_ns] of every file of the model
# folder and of the checkpoint restored: a model replaced in place (weights, scheduler config, tokenizer)
# or a run redone in the same workdir shows without hashing gigabytes.
FOLDER_KEYS = (
    "model",
    "workdir",
    "esd",
    "model_files",
    "esd_sha256",
    "lora_strength",
    "steps",
    "guidance",
    "scheduler",
    "resolution",
    "dtype",
    "checkpoint_step",
    "checkpoint_files",
)
FINGERPRINTS = ("model_files", "checkpoint_files")
IMAGE_KEYS = ("prompt", "seed", "index")  # per image file: what made it (esd_jax.sampling.sampler.Item)
SAMPLE_MARK = "esd-jax sample"  # the PNG text chunk "Software" of every image and grid `esd-jax sample` writes


def mark(maker: str):
    """PIL's PngInfo naming `maker` ("esd-jax sample", "esd-jax evaluate"): `image.save(..., pnginfo=mark(...))`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", maker)
    return info


def made_by(path: Path) -> str | None:
    """The maker a PNG names in its "Software" text chunk; None for any other file (or none readable)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            maker = image.info.get("Software") if image.format == "PNG" else None
    except (OSError, ValueError, SyntaxError):  # not an image, damaged, a folder, unreadable
        return None
    return maker if isinstance(maker, str) else None


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def erased_weights(workdir: Path | None, esd: Path | None, strength: float) -> dict:
    """What an erased model's weights are made of, as records keep it: the run and its latest checkpoint's
    files (a run redone in the same workdir reaches the same step with other weights: its files show it),
    or the delta or LoRA file's hash, and the strength."""
    from esd_jax import checkpoints
    from esd_jax.files import fingerprint

    step = workdir and checkpoints.latest_step(workdir)
    return {
        "workdir": workdir and str(workdir.resolve()),
        "esd": esd and str(esd.resolve()),
        "esd_sha256": esd and sha256(esd),
        "lora_strength": strength,
        "checkpoint_step": step,
        "checkpoint_files": None if step is None else fingerprint(checkpoints.checkpoint_folder(workdir) / str(step)),
    }


def shape_problem(data) -> str | None:
    """What is wrong with the shape of a sample.json's contents, if anything."""
    if not isinstance(data, dict) or data.keys() != {"settings", "images"}:
        return "not a JSON object with the keys settings and images"
    settings, images = data["settings"], data["images"]
    if not isinstance(settings, dict) or settings.keys() != set(FOLDER_KEYS):
        return f"settings are not an object with the keys {', '.join(FOLDER_KEYS)}"
    for key in FINGERPRINTS:
        entries = settings[key]
        if entries is None and key == "checkpoint_files":  # no --workdir
            continue
        if not isinstance(entries, list) or not all(
            isinstance(e, list)
            and len(e) == 3
            and isinstance(e[0], str)
            and all(type(v) is int and 0 <= v < 2**63 for v in e[1:])
            for e in entries
        ):
            return f"{key} is not a list of [path, size, mtime_ns]"
    if not isinstance(images, dict) or not all(
        isinstance(r, dict) and r.keys() == set(IMAGE_KEYS) for r in images.values()
    ):
        return f"images is not an object of {{{', '.join(IMAGE_KEYS)}}} records"
    return None


def weights_of(settings: dict) -> str:
    if settings["workdir"] is not None:
        step = settings["checkpoint_step"]
        return f"run {settings['workdir']}" + ("" if step is None else f" at step {step}")
    if settings["esd"] is not None:
        return f"model {settings['model']} with the delta {settings['esd']}"
    return f"the base model {settings['model']}"


def file_state(entry: tuple[int, int] | None) -> str:
    if entry is None:
        return "absent"
    size, mtime_ns = entry
    return f"{size} bytes modified {datetime.datetime.fromtimestamp(mtime_ns / 1e9).isoformat()}"


def changed_file(old: list[list] | None, new: list[list] | None) -> str:
    """The first file two fingerprints disagree on, and how: "unet/config.json was 812 bytes modified ..., now ..."."""
    was, now = ({path: (size, mtime) for path, size, mtime in entries or []} for entries in (old, new))
    path = next((p for p in sorted(was.keys() | now.keys()) if was.get(p) != now.get(p)), None)
    if path is None:  # the same files listed in another order: a record edited by hand
        return "its files are listed otherwise"
    return f"{path} was {file_state(was.get(path))}, now {file_state(now.get(path))}"


def difference(key: str, old: dict, new: dict) -> str:
    """How images made with the settings `old` differ from those `new` would make, in words."""
    if key in ("model", "workdir", "esd"):
        return f"of {weights_of(old)}, not of {weights_of(new)}"
    if key == "model_files":
        return f"of other files of {new['model']}: {changed_file(old[key], new[key])}"
    if key == "checkpoint_files":
        return (
            f"of an earlier run in {new['workdir']}, whose step {new['checkpoint_step']} checkpoint was since "
            f"replaced (checkpoints/{new['checkpoint_step']}/{changed_file(old[key], new[key])})"
        )
    if key == "esd_sha256":
        return f"of {new['esd']} as it was (sha256 {str(old[key])[:12]}), not as it is (sha256 {new[key][:12]})"
    if key == "checkpoint_step":
        return f"of run {new['workdir']} at step {old[key]}, not step {new[key]}"
    return f"sampled with {key}={old[key]!r}, not {new[key]!r}"


class FolderRecord:
    """A folder's sample.json: the settings its images share, and the (prompt, seed, index) of each image.

    Records whose image file is gone are dropped on reading; the file is rewritten whole (atomically)
    before sampling, without the records of the images about to be remade, and after every batch.
    """

    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / RECORD
        self.settings: dict | None = None
        self.images: dict[str, dict] = {}
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out {folder}: a file, not a folder for images; pass another --out")
        if not self.path.exists():
            return
        way_out = "delete it, and the images there will be remade"
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{self.path} is damaged (not JSON: {e}); {way_out}") from None
        if isinstance(data, dict) and isinstance(data.get("settings"), dict):
            data["settings"].setdefault("lora_strength", 1.0)  # a record from before LoRA files: as trained
        problem = shape_problem(data)
        if problem:
            raise UserError(f"{self.path} is damaged or from an older esd-jax ({problem}); {way_out}")
        self.settings = data["settings"]
        self.images = {name: r for name, r in data["images"].items() if (folder / name).is_file()}

    def check(self, settings: dict, keys: Sequence[str]) -> None:
        """Refuses `settings` if they differ in `keys` from those of the images on record."""
        for key in keys if self.images else ():
            if self.settings[key] != settings[key]:
                raise UserError(
                    f"{self.folder} holds images {difference(key, self.settings, settings)}; "
                    "use another --out, or empty that one"
                )

    def status(self, path: Path, made_from: dict) -> str:
        """Whether the image `path` is on record as made from `made_from` ("kept"), or else why it is
        to be made: "missing", "unrecorded" or "changed"."""
        if not path.exists():
            return "missing"
        if path.name not in self.images:
            return "unrecorded"
        return "kept" if self.images[path.name] == made_from else "changed"

    def check_ours(self, jobs: Sequence[tuple[dict, Path]]) -> None:
        """Refuses before anything is made if an image file to be made again was not written by esd-jax sample
        (the user's own picture under a name a job uses): esd-jax replaces only files it marked as its own."""
        for made_from, path in jobs:
            if self.status(path, made_from) in ("unrecorded", "changed") and made_by(path) != SAMPLE_MARK:
                raise UserError(f"{path}: not made by esd-jax sample; move it away or use another --out")

    def save(self) -> None:
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps({"settings": self.settings, "images": self.images}, indent=1) + "\n")
