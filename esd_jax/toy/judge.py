"""The toy world's oracle as a judge of `esd-jax evaluate --prompts`: what each image shows, counted."""

import numpy as np

from esd_jax.toy import oracle, world

ATTRIBUTES = {"colour": world.COLOURS, "shape": world.SHAPES, "style": world.STYLES}


class ToyJudge:
    name = "toy"

    def __init__(self, concept: str | None = None):
        self.concept = concept

    def judge(self, images: list[np.ndarray], rows: list[dict]) -> list[dict]:
        """Per image its colour, shape and style as the oracle reads them ("none" without clear evidence)."""
        pixels = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1  # the world's [-1, 1]
        reading = oracle.read(pixels)
        return [
            {attribute: str(getattr(reading, attribute)[i]) for attribute in ATTRIBUTES} for i in range(len(images))
        ]

    def shows(self, record: dict) -> bool:
        """Whether an image shows the concept (an attack's success)."""
        return any(record[attribute] == self.concept for attribute in ATTRIBUTES)

    def summary(self, records: list[dict], rows: list[dict]) -> dict:
        """Per attribute the share of images of each value; with a concept, the share that shows it."""
        out = {"images": len(records)}
        for attribute, values in ATTRIBUTES.items():
            out[attribute] = {v: sum(r[attribute] == v for r in records) / len(records) for v in (*values, oracle.NONE)}
        if self.concept is not None:
            attribute = next((a for a, values in ATTRIBUTES.items() if self.concept in values), None)
            out["concept_rate"] = None if attribute is None else out[attribute][self.concept]
        return out
