"""The loss chart, checked on its pixels: where curves, gaps and dots land."""

import math

import numpy as np
import pytest

from lora_lab.training.plot import (BOTTOM, LEFT, PALETTE, RIGHT, TOP, ema, png_bytes,
                                    render_loss_plot)

W, H = 400, 300
PLOT_W, PLOT_H = W - LEFT - RIGHT, H - TOP - BOTTOM
BLUE, ORANGE = PALETTE[0], PALETTE[1]
LIGHT_BLUE = tuple(int(c + (255 - c) * 0.6) for c in BLUE)
LEGEND_ROWS, LEGEND_COLS = 40, 170  # the legend sits in the top right corner of the plot


def plot_mask(img, color):
    """Pixels of ``color`` inside the plot area, legend left out: [rows, cols] bool."""
    area = img[TOP:TOP + PLOT_H, LEFT + 1:LEFT + PLOT_W + 1]
    mask = (area == np.array(color, dtype=np.uint8)).all(axis=-1)
    mask[:LEGEND_ROWS, -LEGEND_COLS:] = False
    return mask


def column_of_step(step, steps):
    return round((step - 1) / (steps - 1) * PLOT_W) - 1  # in plot_mask coordinates


def test_shape_dtype_and_determinism():
    a = render_loss_plot({"loss": [3.0, 2.0, 1.5]}, 0.6, False, W, H)
    b = render_loss_plot({"loss": [3.0, 2.0, 1.5]}, 0.6, False, W, H)
    assert a.shape == (H, W, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert png_bytes(a).startswith(b"\x89PNG\r\n\x1a\n")


def test_decreasing_loss_goes_down_and_spans_the_axis():
    steps = 50
    img = render_loss_plot({"loss": [2.0 - i / steps for i in range(steps)]}, 0.0, False, W, H)
    mask = plot_mask(img, BLUE)
    cols = np.nonzero(mask.any(axis=0))[0]
    assert cols.min() <= 2 and cols.max() >= PLOT_W - 3, "the curve does not span the x axis"
    first = np.nonzero(mask[:, cols.min()])[0].mean()
    last = np.nonzero(mask[:, cols.max()])[0].mean()
    assert last > first + 0.8 * PLOT_H, "a falling loss must be drawn falling"
    assert not plot_mask(img, LIGHT_BLUE).any(), "smoothing 0 draws the raw curve only"


def test_raw_and_smoothed_are_both_drawn():
    values = [1.0 + (0.5 if i % 2 else -0.5) for i in range(40)]
    img = render_loss_plot({"loss": values}, 0.9, False, W, H)
    raw, smooth = plot_mask(img, LIGHT_BLUE), plot_mask(img, BLUE)
    assert raw.any() and smooth.any()
    # the zig-zag spans more rows than its smoothed curve
    assert np.ptp(np.nonzero(raw)[0]) > 2 * np.ptp(np.nonzero(smooth[:, PLOT_W // 2:])[0])


def test_constant_loss_is_one_horizontal_line_in_the_middle():
    img = render_loss_plot({"loss": [0.25] * 10}, 0.6, False, W, H)
    rows = np.nonzero(plot_mask(img, BLUE).any(axis=1))[0] + TOP
    assert rows.size and rows.max() - rows.min() <= 2, rows
    assert abs(rows.mean() - (TOP + PLOT_H / 2)) <= 2
    assert plot_mask(img, BLUE).any(axis=0).sum() >= PLOT_W - 4


def test_one_value_is_a_dot_in_the_centre():
    img = render_loss_plot({"loss": [0.5]}, 0.6, False, W, H)
    ys, xs = np.nonzero(plot_mask(img, BLUE))
    assert 4 <= len(xs) <= 30, "a single value is a small dot"
    assert abs(xs.mean() + LEFT + 1 - (LEFT + PLOT_W / 2)) <= 3
    assert abs(ys.mean() + TOP - (TOP + PLOT_H / 2)) <= 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_gaps(bad):
    steps = 9
    values = [1.0, 0.9, 0.8, 0.7, bad, 0.6, 0.5, 0.45, 0.4]
    img = render_loss_plot({"loss": values}, 0.0, False, W, H)
    mask = plot_mask(img, BLUE)
    left, right = column_of_step(4, steps), column_of_step(6, steps)
    gap = mask[:, left + 4:right - 3]
    assert not gap.any(), "something is drawn where the loss is NaN/Inf"
    assert mask[:, :left].any() and mask[:, right:].any()


def test_extra_series_get_their_own_colour_and_scale():
    img = render_loss_plot({"loss": [1.0, 0.5, 0.25], "val_loss": [4.0, 3.0, 2.0]}, 0.0,
                           False, W, H)
    blue, orange = plot_mask(img, BLUE), plot_mask(img, ORANGE)
    assert blue.any() and orange.any()
    assert np.nonzero(orange)[0].mean() < np.nonzero(blue)[0].mean(), "larger values sit higher"


def test_a_validation_series_of_step_value_pairs_sits_at_its_steps():
    """{"validation": [[step, value], ...]} is drawn at its own steps of the loss's axis."""
    loss = [1.0] * 20
    img = render_loss_plot({"loss": loss, "validation": [[10, 0.5], [20, 0.5]]}, 0.0, False,
                           W, H)
    columns = np.nonzero(plot_mask(img, ORANGE).any(axis=0))[0]
    assert columns.size
    first, last = column_of_step(10, 20), column_of_step(20, 20)
    assert abs(columns.min() - first) <= 3 and abs(columns.max() - last) <= 3


def test_log_scale_spaces_decades_evenly_and_skips_non_positive():
    values = [1.0, 0.1, 0.01, 0.001, 0.0, -1.0, 0.0001]
    img = render_loss_plot({"loss": values}, 0.0, True, W, H)
    mask = plot_mask(img, BLUE)
    steps = len(values)
    rows = [np.nonzero(mask[:, max(0, column_of_step(s, steps) - 1)])[0].mean()
            for s in (2, 3)]
    assert np.isfinite(rows).all()
    # on a linear scale 0.1 and 0.01 nearly coincide; on a log scale they are a decade apart
    assert rows[1] - rows[0] > 0.1 * PLOT_H
    gap = mask[:, column_of_step(4, steps) + 4:column_of_step(7, steps) - 3]
    assert not gap.any(), "values <= 0 must be gaps on a log scale"


@pytest.mark.parametrize("loss_map", [{}, {"loss": []}, {"loss": [float("nan")] * 3},
                                      {"loss": [1.0, 2.0], "note": "text"}])
def test_degenerate_maps_render_axes(loss_map):
    img = render_loss_plot(loss_map, 0.6, False, W, H)
    assert img.shape == (H, W, 3)
    axis = (img[TOP:TOP + PLOT_H, LEFT] == img[TOP + PLOT_H, LEFT]).all(axis=-1)
    assert axis.mean() > 0.9, "the y axis is drawn"


def test_tensor_values_are_accepted():
    torch = pytest.importorskip("torch")
    a = render_loss_plot({"loss": [torch.tensor(1.0), torch.tensor(0.5)]}, 0.6, False, W, H)
    b = render_loss_plot({"loss": torch.tensor([1.0, 0.5])}, 0.6, False, W, H)
    c = render_loss_plot({"loss": [1.0, 0.5]}, 0.6, False, W, H)
    assert np.array_equal(a, c) and np.array_equal(b, c)


def test_ema_is_debiased_and_passes_nan():
    out = ema([2.0, float("nan"), 2.0], 0.9)
    assert out[0] == pytest.approx(2.0) and math.isnan(out[1]) and out[2] == pytest.approx(2.0)
