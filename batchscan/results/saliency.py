"""Where in the picture a score came from: heatmaps for the images people look at.

A flag is easier to trust, or to throw out, when a radiologist can see what the model looked
at: the lungs, or a marker, a tube, the edge of the image. This stage makes, for a few shown
images only (report.html's top flagged studies, evaluation.html's worst errors), a heatmap of
the score over the display picture.

Method: HiResCAM (Draelos & Carin, 2020), the gradient-based class activation map that is
faithful for a CNN whose last convolution layer feeds a flatten and dense head, as the seed
CNN's does. On that layer, the gradient of the score's logit times the activation, element
by element, summed over the feature maps and rectified, is the map; its sum over the picture
is the logit up to a constant, so it shows exactly the places that raised this score. Grad-CAM
(Selvaraju et al., 2017), the usual choice, first averages the gradient over the picture; with
a dense head the gradient is different at every place, and the average is dominated by the
background: on a model that can only have learned one region (tests/test_saliency.py) its
maps were empty (entirely negative), HiResCAM's put a median 85 % of their mass in that
region (6 % of the picture). Taken on the logit rather than the probability so that a
confident score (sigmoid near 1) does not flatten the gradient. The map is 29 x 29 (``conv2``),
upsampled to the model input and drawn over the centre square of the display picture, which
is exactly the region the model saw (:func:`batchscan.ingest.preprocess.preprocess` crops to it).

What a map is worth: it shows which regions raised the score, at the resolution of the last
convolution layer; not a segmentation, not a proof. It shows nothing below the model's 28 px
picture. Tested on a model that can only have learned one region (tests/test_saliency.py).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from batchscan.engines.pipeline import display_and_input
from batchscan.ingest.header import StageOptions
from batchscan.ingest.preprocess import INPUT_SIZE
from batchscan.ingest.sampling import Sampling, resize

#: Side of the display picture the map is drawn over, in pixels (readable, and small in a
#: self-contained page: about 15 kB as JPEG).
PICTURE_SIZE: Final = 256
#: Opacity of the map over the picture where the map is strongest.
OPACITY: Final = 0.6
#: Map values below this share of the map's maximum are not drawn (specks would hide the
#: picture without saying anything).
FLOOR: Final = 0.15


class Explainer:
    """HiResCAM maps of one Keras model of the seed architecture (any chain of layers with a
    Conv2D layer and a final one-unit sigmoid Dense layer).

    Parameters
    ----------
    keras_model:
        The model, as :func:`batchscan.scoring.model.load_model` gives it.
    layer:
        The convolution layer the map is taken on (default: the last Conv2D).
    """

    def __init__(self, keras_model: Any, layer: str | None = None) -> None:
        import keras
        import tensorflow as tf

        layers = list(keras_model.layers)
        conv = [i for i, lyr in enumerate(layers) if isinstance(lyr, keras.layers.Conv2D)]
        if not conv:
            raise ValueError("the model has no Conv2D layer to take a map on")
        at = [lyr.name for lyr in layers].index(layer) if layer else conv[-1]
        # a chain of layers (the seed architecture): run it in two parts, so that the
        # gradient is taken on the very tensor the rest of the chain is computed from
        head, middle, last = layers[: at + 1], layers[at + 1 : -1], layers[-1]
        kernel, bias = (tf.constant(np.asarray(w, np.float32)) for w in last.get_weights())

        def maps(x: Any) -> Any:
            features = x
            for lyr in head:
                features = lyr(features, training=False)
            with tf.GradientTape() as tape:
                tape.watch(features)
                hidden = features
                for lyr in middle:
                    hidden = lyr(hidden, training=False)
                logit = tf.matmul(hidden, kernel) + bias  # the score before its sigmoid
            gradients = tape.gradient(logit, features)
            return tf.nn.relu(tf.reduce_sum(gradients * features, axis=-1))

        self._maps = tf.function(maps, reduce_retracing=True)

    def maps(self, inputs: np.ndarray) -> np.ndarray:
        """Maps of `inputs` (N, 64, 64, 3): (N, 64, 64) float32, each scaled to [0, 1] by
        its maximum (all zero where nothing raised the score)."""
        import tensorflow as tf

        raw = self._maps(tf.convert_to_tensor(np.asarray(inputs, np.float32))).numpy()
        out = np.empty((len(raw), INPUT_SIZE, INPUT_SIZE), np.float32)
        for i, small in enumerate(raw):
            up = resize(small.astype(np.float32), (INPUT_SIZE, INPUT_SIZE))
            up = np.clip(up, 0.0, None)
            top = float(up.max())
            out[i] = up / top if top > 0 else up
        return out


def display_square(
    pixels: np.ndarray, sampling: Sampling | None, size: int = PICTURE_SIZE
) -> np.ndarray:
    """The centre square of a display picture (what the model saw), at `size` px, [0, 1]."""
    return np.clip(resize(pixels, (size, size), sampling, square=True), 0.0, 1.0)


def overlay(picture: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """RGB uint8: the grey `picture` with `heat` (any size, [0, 1]) drawn over it in the
    "jet" colours (red where it is strongest: it stands out on the bright parts of a chest
    radiograph, where yellow and white do not), opaque in proportion to the heat above
    :data:`FLOOR`."""
    from matplotlib import colormaps

    side = picture.shape[0]
    heat = np.clip(resize(heat.astype(np.float32), (side, side)), 0.0, 1.0)
    colours = colormaps["jet"](heat)[..., :3]
    alpha = (OPACITY * np.clip((heat - FLOOR) / (1 - FLOOR), 0.0, 1.0))[..., None]
    grey = np.repeat(picture[..., None], 3, axis=-1)
    return np.rint(255 * ((1 - alpha) * grey + alpha * colours)).astype(np.uint8)


def data_uri(rgb_or_grey: np.ndarray, image_format: str = "JPEG") -> str:
    """An inline image (``data:`` URI) of a uint8 picture, for a self-contained page."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb_or_grey).save(buffer, format=image_format, quality=85, optimize=True)
    kind = "jpeg" if image_format == "JPEG" else image_format.lower()
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def mass_in(heat: np.ndarray, region: np.ndarray) -> float:
    """Share of a map's mass inside a boolean `region` of the same shape."""
    total = float(heat.sum())
    return float(heat[region].sum()) / total if total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Figure:
    """The pictures of one shown image: its map over the display picture (None without a
    model to explain it) and the 64 x 64 model input, both as inline images."""

    overlay: str | None
    model_input: str


def shown_options(manifest: dict[str, Any]) -> StageOptions:
    """The stage options that make a scored image's pictures again as the scan made them
    (its decode settings from the run's manifest), whatever the filters: it was scored."""
    arguments = manifest.get("arguments", {})
    return StageOptions(
        all_modalities=True,
        max_pixel_bytes=int(arguments.get("max_pixel_bytes") or 2**29),
        min_edge=arguments.get("min_edge"),
    )


def run_explainer(manifest: dict[str, Any]) -> Explainer:
    """The map maker of the model a run scored with (its manifest names the file).

    Raises
    ------
    batchscan.scoring.model.ModelError, OSError
        The model file is gone or changed since the run.
    """
    from batchscan.scoring.model import load_model

    return Explainer(load_model(Path(manifest["model"]["path"])).keras_model)


def input_picture(tensor: np.ndarray) -> str:
    """The model input as a PNG ``data:`` URI, at its own 64 x 64 size."""
    grey = np.rint(np.clip(tensor[..., 0], 0, 1) * 255).astype(np.uint8)
    return data_uri(grey, "PNG")


def explain_file(
    path: str | Path,
    options: StageOptions,
    explainer: Explainer | None,
    content: bytes | None = None,
) -> Figure:
    """Decode one file (or its fetched `content`: a PACS's instance) through the scan's
    stages and draw its map.

    Raises
    ------
    ValueError, OSError
        The file is skipped or fails now (moved, changed, unreadable since the scan).
    """
    display, tensor = display_and_input(path, options, content)
    picture = None
    if explainer is not None:
        heat = explainer.maps(tensor[None])[0]
        square = display_square(display.pixels, display.sampling)
        picture = data_uri(overlay(square, heat))
    return Figure(picture, input_picture(tensor))
