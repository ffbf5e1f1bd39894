"""Grad-CAM puts its heat where the class is decided.

Images: flat mean-colour background with the same faint noise in every image, and one
coloured square (its colour is the class) near the corner of a random quadrant; at 64 px
ResNet50's conv5 map is 2 x 2 and VGG's block5 map 4 x 4.

A frozen ResNet50 with random weights keeps the square's place through its residual
shortcuts (measured: the square's quadrant held the most heat in 75 % of 12 images, 0.41 of
the heat; chance is 25 % and 0.25). A random VGG does not (a random 3x3 convolution spreads
a point over its neighbours and block5 sits after 13 of them: 25-33 %, chance level), and
ImageNet weights are not available offline, so the VGG tests write their own weights file:
every convolution passes its input's channels through at the centre tap (no spreading), as
a trained network keeps colour where it is. Either way the linear head trained on top still
has to learn which colour is which class, and Grad-CAM has to find, through the saved
model, where that colour is.
"""

import numpy as np
import pytest
from PIL import Image

import transferkit
from transferkit.evaluation.gradcam import explain

SIZE = 64
COLOURS = {"blue": (20, 20, 230), "green": (20, 200, 20), "red": (230, 20, 20)}


def _write(folder, per_class, seed, background):
    rng = np.random.default_rng(seed)
    side, margin = SIZE // 4, SIZE // 16
    quadrants = {}
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            quadrant = int(rng.integers(4))
            image = background.copy()
            jitter = rng.integers(0, margin + 1, 2)
            y = margin + jitter[0] if quadrant // 2 == 0 else SIZE - side - margin - jitter[0]
            x = margin + jitter[1] if quadrant % 2 == 0 else SIZE - side - margin - jitter[1]
            image[y : y + side, x : x + side] = np.clip(np.array(colour) + rng.integers(-20, 21, 3), 0, 255)
            path = folder / name / f"{index}.png"
            Image.fromarray(image).save(path)
            quadrants[path] = quadrant
    return quadrants


def local_weights(name, path):
    """A weights file whose convolutions copy their input's channels at the centre tap."""
    from transferkit.backbones import load_backbone

    backbone = load_backbone(name, "none", (SIZE, SIZE, 3))
    for layer in backbone.layers:
        if hasattr(layer, "kernel"):
            kernel = np.zeros(layer.kernel.shape, dtype="float32")
            rows, columns, inputs, outputs = kernel.shape
            for out in range(outputs):
                kernel[rows // 2, columns // 2, out % inputs, out] = 1.0
            layer.set_weights([kernel, np.zeros(outputs, dtype="float32")])
    backbone.save_weights(path)
    return path


@pytest.fixture(scope="module", params=["resnet50", "vgg16"])  # the two families (VGG19 is VGG16 deeper)
def region_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("gradcam")
    noise = np.random.default_rng(0).normal(0, 3, (SIZE, SIZE, 3))
    background = np.clip(np.array([124, 117, 104]) + noise, 0, 255).astype("uint8")  # the caffe mean
    _write(root / "train", 12, 1, background)
    test = _write(root / "test", 8, 2, background)
    # ResNet's strided 1x1 convolutions would sample a centre-tap copy away: it keeps random weights.
    weights = "none" if request.param == "resnet50" else str(local_weights(request.param, root / "vgg.weights.h5"))
    overrides = {
        "weights": weights, "backbone": request.param, "image_size": SIZE, "batch_size": 8,
        "head.units": [], "head.batchnorm": False, "head.dropout": 0.0,
        "augment.rotation": 0.0, "augment.shift": 0.0,
        "stages.0.epochs": 30, "stages.0.learning_rate": 0.01, "stages.0.patience": 30, "stages.1:.epochs": 0,
    }
    run = transferkit.finetune(root / "train", None, overrides, output=root / "run", verbose=0)
    return run, root / "test", test


def test_heat_lies_on_the_deciding_quadrant(region_run):
    run, folder, quadrants = region_run
    explanations = explain(run, folder)
    assert len(explanations) == len(quadrants) == 24
    shares, most = [], []
    for item in explanations:
        heat = item.heatmaps[0].heat
        assert heat.dtype == np.float32 and heat.shape == (SIZE, SIZE) and 0 <= heat.min() and heat.max() <= 1
        half = SIZE // 2
        per_quadrant = [heat[(q // 2) * half : (q // 2 + 1) * half, (q % 2) * half : (q % 2 + 1) * half].sum()
                        for q in range(4)]
        quadrant = quadrants[item.file]
        shares.append(per_quadrant[quadrant] / sum(per_quadrant))
        most.append(int(np.argmax(per_quadrant)) == quadrant)
    assert np.mean([item.predicted == item.file.parent.name for item in explanations]) >= 0.75
    # The quadrant is a quarter of the image: chance is 0.25 of the heat and 1 in 4 images
    # (12 or more of 24 by chance: p = 0.003).
    assert np.mean(most) >= 0.5, (most, shares)
    assert np.mean(shares) >= 0.35, shares


def test_the_grid_names_each_cells_file_and_says_when_its_heatmap_is_empty(tmp_path, monkeypatch):
    from pathlib import Path

    from transferkit.evaluation import figures
    from transferkit.evaluation.gradcam import Explanation, Heatmap, plot_grid

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, path: drawn.append(figure) or path)
    image = np.zeros((16, 16, 3), dtype="uint8")
    hot = np.zeros((16, 16), dtype="float32")
    hot[4:8, 4:8] = 1.0
    explanations = [
        Explanation(Path("cats/cat_001.jpg"), image, (Heatmap("cat", 0.91, hot),)),
        Explanation(Path("dogs/a_very_long_file_name_of_a_dog_photo_0042.jpg"), image,
                    (Heatmap("dog", 0.55, np.zeros((16, 16), dtype="float32")),)),
    ]
    plot_grid(explanations, tmp_path / "grid.png")
    titles = [axis.get_title() for axis in drawn[0].axes if axis.get_title()]
    assert titles[0] == "cats/cat_001.jpg\ncat (0.91)"  # with its folder: names repeat across classes
    name, label = titles[1].split("\n")
    assert len(name) <= 24 and name.startswith("dogs/") and name.endswith("_0042.jpg") and "…" in name
    assert label == "dog (0.55); no heat"
    # Each image's own figure says the same: where it is from, and an empty map as such.
    from transferkit.evaluation.gradcam import plot_explanation

    plot_explanation(explanations[1], tmp_path / "dog.png")
    image_title, heat_title = [axis.get_title() for axis in drawn[1].axes if axis.get_title()]
    assert image_title.startswith("dogs/") and image_title.endswith("_0042.jpg")
    assert heat_title == "dog (0.550); no heat"


def test_characters_missing_from_the_plot_font_are_told_once_for_the_explain_folder(tmp_path, caplog):
    import logging
    from pathlib import Path

    from transferkit.evaluation.gradcam import Explanation, Heatmap, write_explanations

    image = np.zeros((16, 16, 3), dtype="uint8")
    heat = np.zeros((16, 16), dtype="float32")
    explanations = [Explanation(Path(f"日本/{index}.png"), image, (Heatmap("日本", 0.5, heat),)) for index in range(3)]
    logger = logging.getLogger("transferkit")
    logger.addHandler(caplog.handler)  # (the CLI may have stopped it propagating to caplog's root)
    try:
        written = write_explanations(explanations, tmp_path / "explain")
    finally:
        logger.removeHandler(caplog.handler)
    assert len([path for path in written if path.suffix == ".png"]) == 4  # three images and the grid
    records = {id(record): record for record in caplog.records}.values()  # (seen by both handlers, or one)
    told = [record.message for record in records if "show as boxes" in record.message]
    assert told == ["the explain figures: some characters of the class names are not in the plot font and show "
                    "as boxes"]
