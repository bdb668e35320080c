"""The FID judge: the Fréchet Inception distance between the base model's images and the erased model's, the
number ESD-style papers give beside COCO prompts for what an erasure costs the images of everything else.

FID is torchmetrics' FrechetInceptionDistance on torch-fidelity's Inception (the TensorFlow FID network ported
to PyTorch; its 2048 pool features per image, or an earlier layer's with `features`). The images are resized to
299 pixels as torch-fidelity and the TensorFlow code resize them (`antialias=False`; torchmetrics' default
smooths first, which moves the number off theirs). Not clean-fid: it resizes otherwise again (PIL bicubic),
and reads NVIDIA's TorchScript copy of the network from a folder of its own; torch-fidelity's weights are a
state dict that torchmetrics takes from a path.

FID estimated from few images is biased upwards, by more the fewer there are (its covariances come from the
samples): compare numbers from the same image counts only, and give thousands where the number matters.
"""

from typing import Any

import numpy as np

from esd_jax.config import FID_FEATURES
from esd_jax.errors import UserError
from esd_jax.judges import torch_hub

# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (torch-fidelity 0.2 to 0.4).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
BATCH = 32


class FIDJudge:
    """FID between the base folder (torchmetrics' real images) and the erased one (its fake images)."""

    name = "fid"

    def __init__(self, features: int = FID_FEATURES[0], batch_size: int = BATCH):
        torch_hub.package_folder(self.name, "torch")
        torch_hub.package_folder(self.name, "torchmetrics")
        # The file before torchvision: torch alone knows where it belongs, and a torchvision that does not load
        # has a line of its own.
        weights = torch_hub.require_download(self.name, "torch-fidelity's Inception weights", INCEPTION_URL)
        torch_hub.load_torchvision(self.name)
        torch_hub.package_folder(self.name, "torch_fidelity")
        import torch
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # The path, not torch.hub: torch-fidelity then reads that file and never builds a download.
        with torch_hub.reading(self.name, weights, INCEPTION_URL):
            metric = FrechetInceptionDistance(
                feature=features, feature_extractor_weights_path=str(weights), antialias=False
            )
        self.metric = metric.to(self.device)
        self.features = features
        self.batch_size = batch_size

    def compare(
        self, base_images: list[np.ndarray], erased_images: list[np.ndarray], rows: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The FID of the two folders and their image counts; no per-image records (FID is of the sets)."""
        if min(len(base_images), len(erased_images)) < 2:
            raise UserError(
                f"FID needs at least 2 images per folder ({len(base_images)} base, {len(erased_images)} erased): "
                "give more prompts or --num_per_prompt"
            )
        self.metric.reset()
        with self.torch.inference_mode():
            for real, images in ((True, base_images), (False, erased_images)):
                for start in range(0, len(images), self.batch_size):
                    batch = np.stack(images[start : start + self.batch_size])  # [B, H, W, 3] uint8
                    self.metric.update(self.torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device), real=real)
            fid = float(self.metric.compute())
        counts = {"base_images": len(base_images), "erased_images": len(erased_images)}
        return {"fid": fid, **counts, "features": self.features}, []
