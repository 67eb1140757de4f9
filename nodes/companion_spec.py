"""The companion nodes' ids, inputs and outputs as plain data (no ComfyUI import).

``nodes/schema.py`` turns a :class:`NodeSpec` into a V3 ``io.Schema``; the CI tests check
these tables (ids, tooltips, defaults) without ComfyUI. Input options: ``default``, ``min``,
``max``, ``step`` for numbers, ``options`` for combos, ``optional``, ``force_input``,
``multiline``, and always a ``tooltip``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..lora.export import FORMATS
from ..training.dataset import RESIZE_MODES

CATEGORY = "LoRA Lab"


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: list[tuple[str, str, dict]]
    outputs: list[tuple[str, str, str, str]]  # (id, type, display name, tooltip)
    flags: dict = field(default_factory=dict)  # is_output_node, not_idempotent, ...
    output_lists: bool = False  # the outputs are lists (ComfyUI's is_output_list)


SAVE_LORA = NodeSpec(
    node_id="LoRALab_SaveLoRA",
    display_name="Save LoRA",
    description=(
        "Save a LoRA as .safetensors into ComfyUI's loras folder, where LoRA loaders and Train "
        "LoRA's existing_lora list it at once. Never overwrites; the header records how it was "
        "trained (also as kohya ss_* keys)."),
    inputs=[
        ("lora", "LORA_MODEL", {"tooltip": "The LoRA to save: Train LoRA's lora output, or any "
                                "LORA_MODEL (ComfyUI's own trainer's too)."}),
        ("filename_prefix", "STRING", {
            "default": "lora_lab/my_lora",
            "tooltip": "File name inside the loras folder; subfolders are allowed, '..' and "
                       "absolute paths are not. A counter (and the steps, if connected) is "
                       "appended, so an existing file is never overwritten."}),
        ("steps", "INT", {
            "optional": True, "force_input": True, "min": 0,
            "tooltip": "Optional: the LoRA's total training steps (Train LoRA's steps output). "
                       "Added to the name as _<steps>_steps_ and to the metadata."}),
        ("format", "COMBO", {
            "optional": True, "options": list(FORMATS), "default": "comfyui",
            "tooltip": "Key names of the file. comfyui: ComfyUI's own (ComfyUI, Forge). kohya: "
                       "what A1111, Forge, InvokeAI and diffusers read: lora_unet_ names (SD1.x/"
                       "SD2.x with diffusers' layer names, SDXL with LDM names; every algorithm), "
                       "or diffusers' transformer.* lora_A/lora_B names for SD3, Flux, Wan and "
                       "other transformers (LoRA only, no norm/bias deltas: anything else is "
                       "refused with the reason)."}),
        ("model", "MODEL", {
            "optional": True,
            "tooltip": "Optional: the model the LoRA was trained on, to name its layers in the "
                       "kohya format. Train LoRA's lora output knows its model already; connect "
                       "this for a LORA_MODEL from elsewhere."}),
    ],
    outputs=[("filename", "STRING", "filename",
              "The saved file's name relative to the loras folder, as LoRA loaders list it.")],
    flags={"is_output_node": True},
)

PLOT_LOSS = NodeSpec(
    node_id="LoRALab_PlotLoss",
    display_name="Plot Loss",
    description=(
        "Draw a LOSS_MAP as a chart (raw and smoothed curves, step and loss axes, every series "
        "the map holds), shown in the node and returned as an IMAGE."),
    inputs=[
        ("loss", "LOSS_MAP", {"tooltip": "The loss map of Train LoRA (or ComfyUI's own trainer): "
                              "one value per step, optionally more named series."}),
        ("smoothing", "FLOAT", {
            "default": 0.6, "min": 0.0, "max": 0.99, "step": 0.01,
            "tooltip": "Exponential moving average weight of the dark curve, as TensorBoard's "
                       "smoothing slider; 0 draws the raw values only."}),
        ("log_scale", "BOOLEAN", {
            "default": False,
            "tooltip": "Logarithmic loss axis (values <= 0 are left out)."}),
        ("width", "INT", {"default": 768, "min": 256, "max": 4096, "step": 8,
                          "tooltip": "Width of the chart in pixels."}),
        ("height", "INT", {"default": 448, "min": 192, "max": 4096, "step": 8,
                           "tooltip": "Height of the chart in pixels."}),
    ],
    outputs=[("image", "IMAGE", "image",
              "The chart as an image; connect Save Image or Preview Image.")],
    flags={"is_output_node": True},
)

APPLY_LORA = NodeSpec(
    node_id="LoRALab_ApplyLoRA",
    display_name="Apply LoRA",
    description=(
        "Apply a LORA_MODEL to a model at a strength, exactly as ComfyUI's LoRA loader does "
        "(the input model is not changed)."),
    inputs=[
        ("model", "MODEL", {"tooltip": "The diffusion model to apply the LoRA to."}),
        ("lora", "LORA_MODEL", {"tooltip": "The LoRA weights, e.g. Train LoRA's lora output."}),
        ("strength", "FLOAT", {
            "default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
            "tooltip": "How strongly the LoRA changes the model; 0 leaves it unchanged, negative "
                       "values invert the LoRA."}),
    ],
    outputs=[("model_with_lora", "MODEL", "model", "The model with the LoRA applied.")],
)

# The folder combo's only option when no folder under ComfyUI's input directory holds images.
NO_IMAGE_FOLDER = "[no image folder in ComfyUI/input]"

LOAD_DATASET = NodeSpec(
    node_id="LoRALab_LoadDataset",
    display_name="Load Image Dataset",
    description=(
        "Load a folder of images and captions from ComfyUI's input directory, resize them, "
        "encode them with the VAE and the captions with CLIP: training data for Train LoRA. "
        "Subfolders named <N>_<name> repeat their images N times (kohya-ss style)."),
    inputs=[
        ("folder", "COMBO", {
            "options": [],
            "tooltip": "A folder of training images in ComfyUI's input directory: put them in "
                       "ComfyUI/input/<your_folder> (png, jpg, webp, ...), each caption as a .txt "
                       "file with the image's name beside it (a.png + a.txt); images in "
                       "<N>_<name> subfolders count N times. Only folders that hold images are "
                       "listed; refresh (R) after adding one."}),
        ("vae", "VAE", {"tooltip": "The VAE of the model you train (it encodes the images)."}),
        ("clip", "CLIP", {"tooltip": "The text encoder of the model you train (it encodes the "
                          "captions)."}),
        ("width", "INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                          "tooltip": "Training width in pixels (a multiple of 8; use 16 for "
                                     "SD3/Flux)."}),
        ("height", "INT", {"default": 512, "min": 64, "max": 8192, "step": 8,
                           "tooltip": "Training height in pixels (a multiple of 8; use 16 for "
                                      "SD3/Flux)."}),
        ("resize_mode", "COMBO", {
            "options": list(RESIZE_MODES), "default": "crop",
            "tooltip": "crop: fill the size and cut the centre out; pad: fit inside and fill the "
                       "rest with black; stretch: scale to the size, ignoring the aspect ratio; "
                       "bucket: each image at the size of about width x height pixels (sides "
                       "multiples of 64) whose aspect ratio is closest to its own, cropping "
                       "only what that needs (several sizes: one output entry per size)."}),
        ("default_caption", "STRING", {
            "optional": True, "default": "", "multiline": True,
            "tooltip": "Caption for images without a .txt file (or with an empty one), e.g. a "
                       "trigger word."}),
    ],
    outputs=[
        ("latents", "LATENT", "latents", "One latent per image (repeats included), in order; "
                                          "connect Train LoRA's latents. A list with one LATENT "
                                          "per size (one in all but bucket mode)."),
        ("positive", "CONDITIONING", "positive", "One conditioning per latent, from its caption; "
                                                 "connect Train LoRA's positive. A list with one "
                                                 "CONDITIONING per LATENT of latents."),
    ],
    output_lists=True,
)

TRAINING_DATA_FOLDER = "training_data"  # under ComfyUI's output directory
NO_TRAINING_DATA = "[no training data yet]"

SAVE_TRAINING_DATA = NodeSpec(
    node_id="LoRALab_SaveTrainingData",
    display_name="Save Training Data",
    description=(
        "Save latents and their conditioning as files (safetensors and JSON, no pickle) under "
        "output/training_data/, for the headless trainer (python -m lora_lab train, also "
        "under torchrun on several GPUs) or Load Training Data. Never overwrites."),
    inputs=[
        ("latents", "LATENT", {"tooltip": "The training latents: a LATENT or a list of them "
                               "(as Train LoRA takes them); noise masks are kept."}),
        ("positive", "CONDITIONING", {"tooltip": "Their conditioning, as Train LoRA takes it "
                                      "(extras such as pooled_output and guidance are kept)."}),
        ("name", "STRING", {"default": "my_dataset", "tooltip": (
            "Folder name under output/training_data/; a counter is added when it exists.")}),
    ],
    outputs=[("folder", "STRING", "folder",
              "The folder written (relative to ComfyUI's output directory).")],
    flags={"is_output_node": True, "is_input_list": True},
)

LOAD_TRAINING_DATA = NodeSpec(
    node_id="LoRALab_LoadTrainingData",
    display_name="Load Training Data",
    description="Load latents and conditioning that Save Training Data wrote.",
    inputs=[
        ("folder", "COMBO", {"options": [NO_TRAINING_DATA], "default": NO_TRAINING_DATA,
                             "tooltip": "A folder under output/training_data/ that Save "
                                        "Training Data wrote; refresh (R) after saving."}),
    ],
    outputs=[
        ("latents", "LATENT", "latents", "The saved LATENTs (a list, one per saved LATENT); "
                                         "connect Train LoRA's latents."),
        ("positive", "CONDITIONING", "positive", "Their conditioning (a list, one per "
                                                 "LATENT); connect Train LoRA's positive."),
    ],
    output_lists=True,
)

COMPANION_NODES = [SAVE_LORA, PLOT_LOSS, APPLY_LORA, LOAD_DATASET, SAVE_TRAINING_DATA,
                   LOAD_TRAINING_DATA]
