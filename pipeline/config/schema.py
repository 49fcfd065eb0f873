"""The params schema: one typed, closed dataclass per `params.yaml` section, each field with its
default and, where it has one, its allowed range or choices beside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config.rules import (
    CHOICES,
    RULE,
    Range,
    collect,
    count,
    fraction,
    one_of,
    positive_int,
    ranged,
)

# caption.model's choices; each is also a models.<name> section.
CAPTIONERS = ("blip2", "blip", "llava")


@dataclass
class BaseConfig:
    seed: int = ranged(0, Range(True, 0, 2**32 - 1, why="numpy and torch seeds"))
    # "auto" picks cuda when torch sees a GPU, else cpu.
    device: str = one_of("auto", ("auto", "cpu", "cuda", "mps"))
    # "auto" is float16 on cuda and float32 on cpu (bf16 autocast is ~5x slower on CPUs without
    # bf16 instructions, so it is never chosen automatically).
    dtype: str = one_of("auto", ("auto", "float32", "float16", "bfloat16"))
    # "local" runs shards one after another in this process; "dask" sends each shard to a
    # Dask distributed cluster (dask_address, or a LocalCluster of n_workers when empty).
    scheduler: str = one_of("local", ("local", "dask"))
    dask_address: str = ""
    n_workers: int = ranged(2, positive_int("Dask workers"))
    # Processes that decode and preprocess images while the model runs (pipeline.rows.reader):
    # 0 decodes in the main process; -1 (auto) gives each extraction process on the machine an
    # equal share of its CPUs less one, at most 32. Rows do not depend on it.
    decode_workers: int = ranged(
        -1, Range(True, -1, 64, why="decode processes; -1 = auto, 0 = main process")
    )
    # Where encode decodes JPEGs: "cpu" (PIL, in the decode workers) or "gpu" (nvJPEG on the
    # model's CUDA device, batched; crops and CLIP resize there too). gpu falls back to cpu,
    # with a log line, off CUDA or without nvJPEG. Its pixels differ slightly from PIL's, so
    # it is part of the encode rows' key (pipeline.extract.device_decode).
    decode: str = one_of("cpu", ("cpu", "gpu"))
    # On CUDA the caption/ground/encode batch sizes are multiplied by this (the params' sizes
    # suit a CPU; a GPU wants larger batches). 1 takes them as given. Rows do not depend on it.
    cuda_batch_scale: int = ranged(4, positive_int("batch-size multiplier on CUDA"))


@dataclass
class ModelSpec:
    # Upstream name of the model (Hugging Face id, or open_clip architecture name).
    id: str = ""
    # open_clip pretrained tag (CLIP only), e.g. "openai".
    pretrained: str = ""
    # A local checkpoint file (open_clip) or save_pretrained directory (transformers);
    # empty means the library's own cache (~/.cache/huggingface, ~/.cache/clip).
    path: str = ""


@dataclass
class ModelsConfig:
    # "paper": the real weights the seeds used; "tiny": small random models, offline, for smoke
    # runs and tests (their outputs are meaningless and marked so in every shard).
    preset: str = one_of("paper", ("paper", "tiny"))
    clip: ModelSpec = field(default_factory=lambda: ModelSpec("ViT-L-14", "openai"))
    # The captioners (caption.model picks one).
    blip2: ModelSpec = field(default_factory=lambda: ModelSpec("Salesforce/blip2-opt-2.7b"))
    blip: ModelSpec = field(
        default_factory=lambda: ModelSpec("Salesforce/blip-image-captioning-large")
    )
    llava: ModelSpec = field(default_factory=lambda: ModelSpec("llava-hf/llava-1.5-7b-hf"))
    grounding: ModelSpec = field(
        default_factory=lambda: ModelSpec("IDEA-Research/grounding-dino-base")
    )
    bert: ModelSpec = field(default_factory=lambda: ModelSpec("bert-base-uncased"))
    dinov2: ModelSpec = field(default_factory=lambda: ModelSpec("facebook/dinov2-base"))


@dataclass
class DataConfig:
    # Name of the dataset's folder under cache/.
    name: str = "sample"
    # A folder holding manifest.csv, a folder in a known layout, or a manifest CSV.
    path: str = "data/sample"
    # auto | manifest | cnndetection | genimage | synthbuster | ct2 (see pipeline.data).
    layout: str = one_of(
        "auto", ("auto", "manifest", "cnndetection", "genimage", "synthbuster", "ct2")
    )


@dataclass
class IngestConfig:
    # Images per shard: a shard is the unit of resumption and of parallel work.
    shard_size: int = ranged(64, positive_int("images per shard"))
    # train/val/test fractions used only when the manifest gives no split.
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    # At most this many images per folder (split and subset) and class are kept, drawn seeded as
    # UniversalFakeDetect draws its test images (pipeline.data.subsets); 0 keeps all. ITEM trains
    # on 40,000 real and 40,000 ProGAN images, not all 720k of CNNDetection's train set.
    max_per_class: int = ranged(0, count("images per folder and class; 0 = all"))
    # Share of each generator's train images moved (seeded, groups whole) to val when the
    # dataset has train but no val: GenImage ships train and val, and its val is our test.
    # 0 keeps such a dataset without val (no model selection, calibration or val threshold).
    val_from_train: float = ranged(
        0.1, Range(False, 0, 0.9, why="share of each generator's train rows carved into val")
    )
    # Images smaller than this on either side are quarantined (CLIP upsamples them to 224 px,
    # which says more about the resampler than about the image).
    min_side: int = ranged(16, positive_int("pixels"))
    # Captions/prompts whose word sets, each word weighted by its rarity across the dataset's
    # prompts (template words weigh almost nothing), have a weighted Jaccard of at least this
    # are one split group (prompt variants of one scene must not straddle train and test); 1.0
    # groups identical word sets only. See pipeline.data.split.near_duplicate_groups.
    caption_similarity: float = ranged(
        0.5,
        Range(
            False,
            0,
            1,
            lo_open=True,
            why="weighted word Jaccard at which captions are one split group",
        ),
    )
    # A prompt of 4+ words lying at least this much (by weight) inside a longer one is a
    # variant of it (", by greg rutkowski, octane render, 4k" appended) and joins its group.
    caption_containment: float = ranged(
        0.8,
        Range(
            False,
            0,
            1,
            lo_open=True,
            why="weighted share of a prompt inside a longer one that makes it a variant",
        ),
    )
    # Images whose long side exceeds this many times the short side are quarantined: the
    # models' processors resize the short side to their input size, so an 8000x16 strip would
    # become a 0-pixel-high tensor (GroundingDINO) or a 224x0.4 px smear (CLIP).
    max_aspect_ratio: float = ranged(
        20.0,
        Range(
            False, 1, 50, why="long side / short side; past 50 the models' resizers lose the image"
        ),
    )
    # Apply the EXIF orientation tag before anything sees the pixels, as every photo viewer
    # does; false keeps the stored pixel order.
    exif_transpose: bool = True


@dataclass
class CaptionConfig:
    # "blip2": every image captioned by the same model (caption.model), as ITEM does (default:
    # a dataset's own captions are often human COCO captions for real photos and prompts for
    # generated images, so their style tells the label); "dataset": the manifest's captions
    # (CT2-style data, where real and generated images share one caption);
    # "dataset_else_blip2": the manifest's caption where present, caption.model for the rest.
    source: str = one_of("blip2", ("dataset", "blip2", "dataset_else_blip2"))
    # The captioner (its weights: models.<model>): BLIP-2 as in ITEM; BLIP and LLaVA are the
    # other captioners of ITEM's Fig. 7.
    model: str = one_of("blip2", CAPTIONERS)
    batch_size: int = ranged(8, positive_int("images per batch"))
    # Optional text prompt: a prefix the caption continues for BLIP-2 and BLIP (empty:
    # unconditional captioning, as in ITEM); LLaVA's instruction (empty: ITEM's, "Please
    # generate a one-sentence caption for the input image.").
    prompt: str = ""
    num_beams: int = ranged(3, positive_int("beam search width"))
    max_new_tokens: int = ranged(30, positive_int("tokens"))


@dataclass
class GroundConfig:
    # Whether to ground objects at all; without grounding D_local follows features.empty_local.
    enabled: bool = True
    batch_size: int = ranged(4, positive_int("images per batch"))
    # GroundingDINO's defaults from its model card.
    box_threshold: float = ranged(0.35, fraction("a score"))
    text_threshold: float = ranged(0.25, fraction("a score"))
    max_objects: int = ranged(10, count("objects kept per image"))
    # Boxes of one phrase overlapping a higher-scoring box of that phrase by more than this IoU
    # are the same object found twice; only the best is kept (1.0 keeps every box).
    iou_threshold: float = ranged(
        0.8, fraction("IoU above which boxes of one phrase are merged; 1 keeps all")
    )
    # After the grounder's post-processing, boxes of one phrase overlapping a higher-scoring
    # box of that phrase by more than this IoU are dropped (greedy NMS per phrase), as GLIP,
    # ITEM's grounder, ends its inference (MODEL.ATSS.NMS_TH 0.6); 1.0 keeps every box. ITEM's
    # D_local averages over objects: without it one phrase found many times weighs many times.
    nms_iou: float = ranged(0.6, fraction("IoU above which boxes of one phrase are suppressed"))
    # Boxes with a side shorter than this many pixels are dropped: CLIP would see a few
    # upsampled pixels, not an object.
    min_box_side: int = ranged(8, count("pixels; smaller boxes are dropped"))
    # Fraction of the box size added on every side of a crop before CLIP sees it; 0 because
    # ITEM's object image x_i is the grounded region itself.
    crop_padding: float = ranged(0.0, Range(False, 0, 10, why="fraction of the box size"))


@dataclass
class EncodeConfig:
    batch_size: int = ranged(16, positive_int("images per batch"))
    # How a whole image becomes CLIP's 224 px input: center_crop is UFD's evaluation crop
    # (validate.py: the central 224x224 pixels, no resize; smaller sides padded with black),
    # which ITEM follows ("center-cropped into 224x224"); resize_center_crop is open_clip's
    # (shortest side to 224, then the centre). Object crops are always resized.
    image_transform: str = one_of("center_crop", ("center_crop", "resize_center_crop"))
    # Template for each grounded phrase before the CLIP text encoder ("{}" = the phrase itself).
    phrase_template: str = "{}"
    # Also cache BERT caption features (CT2 text variant) and DINOv2 image features.
    bert: bool = False
    dinov2: bool = False
    # Colour histograms (RGB, HSV, YCbCr) of the decoded image, bins per channel (0 = off).
    color_bins: int = ranged(0, Range(True, 0, 256, why="bins per channel, 0 = off"))
    # Also cache CLIP's vision output before its projection (CT2's image feature; kinds
    # image_pooled, bert_image_pooled). ViT models only.
    clip_pooled: bool = False
    # CLIP prompts of the classes (index 0 real, 1 generated) for zero-shot logits, e.g. in
    # Tip-Adapter. Encoded once per run into class_prompts.h5; not part of the rows' cache key.
    class_prompts: list[str] = field(
        default_factory=lambda: ["a real photograph.", "an image generated by AI."]
    )


@dataclass
class FeaturesConfig:
    # Which feature set the heads consume: item, item_global, item_local, tidy, tidy_global,
    # item_n_objects, tidy_n_objects, image, image_raw, text, image_text (see
    # pipeline.feature_kinds.KINDS).
    kind: str = "item"
    # D = w1*D_global + w2*D_local; ITEM sets both to 1.0.
    w1: float = ranged(1.0, Range(False, why="weight of D_global"))
    w2: float = ranged(1.0, Range(False, why="weight of D_local"))
    # D_local of an image with no grounded object: "zeros" (no local evidence) or "global"
    # (fall back to D_global, i.e. treat the whole image as its only object).
    empty_local: str = one_of("zeros", ("zeros", "global"))


@dataclass
class TrainConfig:
    # Heads to train, by registry name (pipeline.heads.HEADS).
    heads: list[str] = field(
        default_factory=lambda: ["mlp", "svm", "multitask", "tip_adapter", "meta"]
    )
    # Hyperparameters per head; keys are checked against the head's constructor.
    mlp: dict[str, Any] = field(
        default_factory=lambda: {"hidden": 512, "epochs": 50, "lr": 0.001, "weight_decay": 0.001}
    )
    svm: dict[str, Any] = field(default_factory=lambda: {"C": 1.0})
    multitask: dict[str, Any] = field(default_factory=lambda: {"hidden": 512, "epochs": 50})
    # Tip-Adapter-F as published: a cache of 16 shots per class (seeded), paper's affinity.
    tip_adapter: dict[str, Any] = field(default_factory=lambda: {"finetune": True, "n_shots": 16})
    meta: dict[str, Any] = field(default_factory=lambda: {"base_heads": ["mlp", "svm"]})
    # UniversalFakeDetect's released linear probe: {weights: path of its fc_weights.pth}; it
    # always reads the features kind image_raw (pipeline.heads.ufd_probe).
    ufd_probe: dict[str, Any] = field(default_factory=dict)
    # Feature kind per head where it differs from features.kind: Tip-Adapter's zero-shot term
    # compares CLIP *image* features with CLIP text embeddings of the class prompts.
    head_kinds: dict[str, str] = field(default_factory=lambda: {"tip_adapter": "image"})
    # Classes of attribution heads (multitask): the generator, or its family (seed 003).
    attribution_target: str = one_of("generator", ("generator", "family"))
    # Post-hoc calibration of p_generated, fitted on val: none | temperature | platt.
    calibration: str = one_of("temperature", ("none", "temperature", "platt"))
    # Pseudo-labelling (CT2): confident predictions on the pseudo_pool split are added 80/20
    # to train/val and the head is refitted. Using the evaluation split as the pool needs
    # pseudo_allow_eval_split, and marks every metric of the run as contaminated.
    pseudo_label: bool = False
    # train and val already feed the heads; the pool is the manifest's unlabelled rows (or,
    # with pseudo_allow_eval_split, the test split).
    pseudo_pool: str = one_of("unlabelled", ("unlabelled", "test"))
    pseudo_threshold: float = ranged(0.8, Range(False, 0.5, 1, why="confidence of a pseudo-label"))
    pseudo_allow_eval_split: bool = False


@dataclass
class EvaluateConfig:
    # Split scored into metrics/eval.json. Only evaluate ever reads it.
    # Only test: train and val shape the heads (selection, calibration, threshold), so scoring
    # them would report optimistic numbers.
    split: str = one_of("test", ("test",))
    threshold: float = ranged(0.5, fraction("a probability"))
    # Perturbed copies of the evaluation split, each scored into metrics/eval_<name>.json
    # (ITEM's robustness study: Gaussian noise σ on [0,1] pixels, Gaussian blur σ, JPEG quality).
    perturbations: list[str] = field(
        default_factory=lambda: [
            "noise_0.001",
            "noise_0.005",
            "noise_0.01",
            "blur_1",
            "blur_2",
            "blur_3",
            "jpeg_75",
            "jpeg_50",
            "jpeg_25",
        ]
    )
    # Other datasets to score, name -> path (folder or manifest); metrics/eval_<name>.json.
    datasets: dict[str, str] = field(default_factory=dict)
    # At most this many real and this many generated images per folder of each of those
    # datasets are ingested and scored, drawn as UniversalFakeDetect's validate.py draws them
    # (seeded shuffle, first N; pipeline.data.subsets); UFD uses 1,000. 0 scores every image.
    max_per_class: int = ranged(0, count("images per folder and class; 0 = all"))
    # JPEG qualities of seed 003's train × test matrix (empty: skip), and the heads it trains.
    qf_matrix: list[int] = field(default_factory=lambda: [40, 65, 90])
    qf_heads: list[str] = field(default_factory=lambda: ["svm"])


@dataclass
class Params:
    base: BaseConfig = field(default_factory=BaseConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    ground: GroundConfig = field(default_factory=GroundConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# Every numeric param (typed fields) and its allowed range, by dotted key. Types are checked
# when the params are built; these are the values that would crash a stage hours in, or worse,
# run and write something meaningless (an empty caption batch, deleted shards, NaN features).
RANGES: dict[str, Range] = collect(Params, RULE)
# Every string param with a closed set of values, by dotted key.
CHOICES_OF: dict[str, tuple[str, ...]] = collect(Params, CHOICES)
