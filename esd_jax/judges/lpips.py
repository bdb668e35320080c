"""The LPIPS judge of ESD's style erasure: how far each erased image moved from the base model's image of the
same prompt, seed and index (LPIPS, AlexNet; lower is closer). ESD reports it for the prompts of other artists,
whose images an erasure should leave alone.

LPIPS is torchmetrics' LearnedPerceptualImagePatchSimilarity, net_type "alex": richzhang's lpips 0.1, which
ESD's eval-scripts/lpips_eval.py runs (`lpips.LPIPS(net='alex')`), its linear layers shipped in torchmetrics'
wheel and its AlexNet torchvision's ImageNet weights. That script first resizes each image with torchvision's
`Resize(64)` (the shorter side to 64 pixels, PIL bilinear) and LPIPS reads the two 64-pixel images; `size`
does the same, and 0 compares the images as they are.
"""

from typing import Any

import numpy as np
from PIL import Image

from esd_jax.config import LPIPS_SIZE
from esd_jax.errors import UserError
from esd_jax.judges import torch_hub

# torchvision's AlexNet_Weights.IMAGENET1K_V1, what torchmetrics' LPIPS has torchvision load; and where in
# torchmetrics' package its linear layers lie.
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LINEAR_LAYERS = "functional/image/lpips_models/alex.pth"
BATCH = 32


def shrink(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision's Resize(size) of the image as a PIL image: the shorter side to `size`, PIL bilinear."""
    h, w = image.shape[:2]
    long = int(size * max(h, w) / min(h, w))
    hw = (size, long) if h <= w else (long, size)
    if hw == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize(hw[::-1], Image.BILINEAR))


class LPIPSJudge:
    """LPIPS of each erased image to the base model's image of the same row and index."""

    name = "lpips"

    def __init__(self, size: int = LPIPS_SIZE, batch_size: int = BATCH):
        torch_hub.package_folder(self.name, "torch")
        metrics = torch_hub.package_folder(self.name, "torchmetrics")
        # The files before torchvision: torch alone knows where they belong, and a torchvision that does not
        # load has a line of its own.
        alexnet = torch_hub.require_download(self.name, "torchvision's AlexNet weights", ALEXNET_URL)
        torch_hub.require(
            metrics / LINEAR_LAYERS, "LPIPS's linear layers", "they ship in torchmetrics' wheel: reinstall it"
        )
        torch_hub.load_torchvision(self.name)
        import torch
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with torch_hub.reading(self.name, alexnet, ALEXNET_URL):
            metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True)
        self.metric = metric.to(self.device)
        self.size = size
        self.batch_size = batch_size

    def tensor(self, images: list[np.ndarray]):
        """[B, 3, H, W] in [0, 1], as ToTensor gives it (torchmetrics' `normalize=True` maps it to [-1, 1])."""
        batch = np.stack(images).astype(np.float32) / 255.0
        return self.torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)

    def compare(
        self, base_images: list[np.ndarray], erased_images: list[np.ndarray], rows: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Per image its LPIPS to the base image of its row and index; the summary: the mean over the images
        and per prompt (its case_number) the mean over its images, as ESD's script adds to the prompt CSV."""
        if not len(base_images) == len(erased_images) == len(rows):
            raise ValueError(f"{len(base_images)} base and {len(erased_images)} erased images for {len(rows)} rows")
        if self.size:
            base_images = [shrink(image, self.size) for image in base_images]
            erased_images = [shrink(image, self.size) for image in erased_images]
        for base, erased, row in zip(base_images, erased_images, rows, strict=True):
            if base.shape != erased.shape:
                raise UserError(
                    f"image {row['case_number']}_{row['index']}.png is {base.shape[1]}x{base.shape[0]} in the base "
                    f"folder and {erased.shape[1]}x{erased.shape[0]} in the erased one: LPIPS compares images of "
                    "one size (--lpips_size resizes both)"
                )
        self.metric.reset()
        with self.torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                end = start + self.batch_size
                self.metric.update(self.tensor(base_images[start:end]), self.tensor(erased_images[start:end]))
            scores = self.metric.compute().reshape(-1).tolist()  # [N]
        records = [{"lpips": float(s)} for s in scores]
        per_prompt: dict[str, list[float]] = {}
        for row, score in zip(rows, scores, strict=True):
            per_prompt.setdefault(str(row["case_number"]), []).append(score)
        summary = {
            "images": len(records),
            "lpips": float(np.mean(scores)),
            "per_prompt": {case: float(np.mean(s)) for case, s in per_prompt.items()},
            "size": self.size,
        }
        return summary, records
