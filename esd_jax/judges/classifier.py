"""The ImageNet classifier judge of ESD's object erasure (the paper's Table 2): top-1 and top-5 accuracy
on images of prompts that name a class, on the erased class and pooled over every other class.

The official eval-scripts/imageclassify.py scores torchvision's ResNet-50 on data/small_imagenet_prompts.csv
(columns case_number, prompt, evaluation_seed, class; class is an ImageNet name such as "cassette player").
Here the classifier is any transformers image-classification model, microsoft/resnet-50 by default, and a
CSV class is matched to the model's labels by name: ImageNet labels in transformers list their synonyms
("tench, Tinca tinca"), and a class names a label when it equals one of them, case aside.
"""

import difflib
from typing import Any

import numpy as np

from esd_jax.errors import UserError
from esd_jax.hub import local_folder

TOP_K = 5  # top-5 accuracy, as the paper reports beside top-1


def normal(name: str) -> str:
    """A class or synonym as names are compared: case and runs of spaces do not count."""
    return " ".join(name.split()).casefold()


def match_label(name: str, id2label: dict[int, str]) -> frozenset[int]:
    """The ids of every label that lists `name` among its comma-separated synonyms.

    A name may name several labels (ImageNet has two "crane"s, a bird and a machine); a prediction of
    any of them counts, as it does for the official script, which compares names.
    """
    wanted = normal(name)
    ids = frozenset(i for i, label in id2label.items() if wanted in {normal(s) for s in label.split(",")})
    if not ids:
        synonyms = sorted({s.strip() for label in id2label.values() for s in label.split(",")})
        closest = difflib.get_close_matches(name.strip(), synonyms, n=3)
        hint = f" (closest: {', '.join(closest)})" if closest else ""
        raise UserError(f"class {name!r} names none of the classifier's {len(id2label)} labels{hint}")
    return ids


def accuracy(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not records:
        return None
    n = len(records)
    return {
        "images": n,
        "top1": sum(r["correct1"] for r in records) / n,
        "top5": sum(r["correct5"] for r in records) / n,
    }


class ClassifierJudge:
    """Classifies each image and checks the label against the class its prompt's row names."""

    name = "classifier"

    def __init__(self, model: str = "microsoft/resnet-50", batch_size: int = 32, concept: str | None = None):
        """`concept`: the erased class, whose accuracy the summary gives apart from the others'."""
        try:
            import torch
            from transformers import AutoImageProcessor, AutoModelForImageClassification
        except ImportError as e:
            missing = e.name or str(e).splitlines()[0]
            raise UserError(
                f'the classifier judge needs torch and transformers ({missing} is missing): pip install -e ".[eval]"'
            ) from None
        source = local_folder(model, ["*.json", "*.safetensors"], "classifier", "microsoft/resnet-50")
        try:
            self.processor = AutoImageProcessor.from_pretrained(source)
            net = AutoModelForImageClassification.from_pretrained(source)
        except (OSError, ValueError) as e:
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise UserError(
                f"classifier {model!r}: transformers cannot load it as an image classifier ({first})"
            ) from None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = net.to(self.device).eval()
        self.id2label = {int(i): label for i, label in net.config.id2label.items()}
        self.batch_size = batch_size
        self.k = min(TOP_K, len(self.id2label))
        self.concept = concept

    def check_rows(self, rows: list[dict[str, Any]]) -> None:
        self.class_ids(rows)

    def class_ids(self, rows: list[dict[str, Any]]) -> dict[str, frozenset[int]]:
        """Each row class's label ids; a row without a class, or a class no label lists, is an error.
        Cheap, so a caller can check a prompt file before it samples a single image."""
        if any("class" not in row for row in rows):
            raise UserError(
                "the prompt file has no column 'class'; the classifier judge needs the ImageNet class each "
                "prompt names (as the official data/small_imagenet_prompts.csv has)"
            )
        return {cls: match_label(cls, self.id2label) for cls in dict.fromkeys(row["class"].strip() for row in rows)}

    def judge(self, images: list[np.ndarray], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per image (uint8 [H, W, 3] RGB, with its CSV row): its class, the model's top-1 and top-5
        labels, and whether they hold the class."""
        import torch
        from PIL import Image

        if len(images) != len(rows):
            raise ValueError(f"{len(images)} images and {len(rows)} rows; the judge needs one row per image")
        wanted = self.class_ids(rows)
        records = []
        for start in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(np.asarray(image, np.uint8)) for image in images[start : start + self.batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                logits = self.model(**inputs).logits  # [B, num_labels]
            top = logits.topk(self.k, dim=-1).indices.tolist()  # [B, k], best first
            for ids, row in zip(top, rows[start : start + self.batch_size], strict=True):
                cls = row["class"].strip()
                records.append(
                    {
                        "class": cls,
                        "top1": self.id2label[ids[0]],
                        "top5": [self.id2label[i] for i in ids],
                        "correct1": ids[0] in wanted[cls],
                        "correct5": not wanted[cls].isdisjoint(ids),
                    }
                )
        return records

    def shows(self, record: dict[str, Any]) -> bool:
        """Whether the top label is the class of the image's row (an attack's success: the erased class)."""
        return bool(record["correct1"])

    def summary(self, records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Accuracy (fractions) per class, on the erased class (`concept`, matched by name, case aside) and
        pooled over every other class; "erased" is None without one, "others" None if no other class is there."""
        erased = self.concept
        classes = [row["class"].strip() for row in rows]
        per_class: dict[str, list[dict[str, Any]]] = {}
        for cls, record in zip(classes, records, strict=True):
            per_class.setdefault(cls, []).append(record)
        if erased is not None and not any(normal(cls) == normal(erased) for cls in per_class):
            raise UserError(
                f"the erased class {erased!r} is none of the prompt file's classes ({', '.join(list(per_class)[:5])}"
                f"{', ...' if len(per_class) > 5 else ''})"
            )
        hit = [erased is not None and normal(cls) == normal(erased) for cls in classes]
        return {
            "per_class": {cls: accuracy(group) for cls, group in per_class.items()},
            "erased": accuracy([r for r, h in zip(records, hit, strict=True) if h]),
            "others": accuracy([r for r, h in zip(records, hit, strict=True) if not h]),
        }
