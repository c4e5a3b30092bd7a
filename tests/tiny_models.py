"""Tiny random-weight checkpoints of the real model architectures the pipeline loads, built offline.

Each ``save_tiny_*`` function builds a model with a fixed seed (``torch.manual_seed(0)`` inside a forked RNG, so
the caller's random state is left alone), saves it together with its processor or tokenizer into a directory
(created if missing) as ``.safetensors`` files and returns that directory. The directory then loads exactly like a
Hub checkpoint: ``AutoProcessor.from_pretrained(path)``, ``AutoModel*.from_pretrained(path)`` or
``AutoPipelineForInpainting.from_pretrained(path)``. Nothing is downloaded: the tokenizers are built from
vocabularies defined here. Each builder takes 0.05-0.3 s on a CPU and a forward pass less (importing
transformers and diffusers costs more, ~3 s and ~1 s).

Inference calls these checkpoints were checked with (transformers 5.23, diffusers 0.42):

Grounding DINO (``save_tiny_grounding_dino``)::

    inputs = processor(images=[img1, img2], text=["a cat. a dog.", "a cat. a dog."],
                       return_tensors="pt", padding=True)
    # also accepted: text=[["a cat", "a dog"], ["person"]] (labels per image, merged to "a cat. a dog.")
    outputs = model(**inputs)
    results = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.25, text_threshold=0.25, target_sizes=[(h1, w1), (h2, w2)])
    # one dict per image: "scores" (n,), "boxes" (n, 4) absolute xyxy, "text_labels" (list[str]);
    # "labels" still holds strings too but warns (FutureWarning) - read "text_labels".

The old ``box_threshold=`` argument is now ``threshold=``. The model hard-codes the bert-base-uncased ids of its
phrase delimiters (``[CLS]``=101, ``[SEP]``=102, ``.``=1012, ``?``=1029, ``[PAD]``=0), so the tiny vocabulary puts
those tokens at the same ids.

SAM (``save_tiny_sam``)::

    inputs = processor(images=[img1, img2], input_boxes=[[[x0, y0, x1, y1], ...], [[x0, y0, x1, y1], ...]],
                       return_tensors="pt")
    outputs = model(**inputs, multimask_output=True)
    # pred_masks (images, boxes, 3, 64, 64), iou_scores (images, boxes, 3)
    masks = processor.image_processor.post_process_masks(
        outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    # list with one bool tensor (boxes, 3, h, w) per image

SAM 2 (``save_tiny_sam2``; ``Sam2Model``/``Sam2Processor``)::

    inputs = processor(images=[img1, img2], input_boxes=[[[x0, y0, x1, y1], ...], [...]], return_tensors="pt")
    outputs = model(**inputs, multimask_output=True)   # same output shapes as SAM
    masks = processor.image_processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])
    # (no reshaped_input_sizes: SAM 2 resizes to a square without padding); list of bool (boxes, 3, h, w)

In a batch every image must have the same number of boxes, for both SAM and SAM 2 (SAM fails in numpy with
"inhomogeneous shape", SAM 2 with "boxes cannot be padded"): group images by box count or call per image.

Inpainting (``save_tiny_inpaint_pipeline``)::

    pipe = StableDiffusionInpaintPipeline.from_pretrained(path)   # or AutoPipelineForInpainting
    pipe(prompt=..., image=img, mask_image=mask, num_inference_steps=2, height=64, width=64).images

Without ``height``/``width`` the pipeline renders at ``unet.config.sample_size * vae_scale_factor`` (64 here), not at
the input image's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# A WordPiece vocabulary laid out like bert-base-uncased where it matters (special tokens and "." / "?" ids, see
# above), with common lower-case words plus single letters and "##" letter pieces, so any lower-case phrase
# tokenizes into known pieces instead of [UNK].
_WORDS = """
a an the of and in on with at near by under over behind front left right top bottom side
cat dog person car cup helmet rocket flag clock coin
man woman boy girl child baby people player rider driver
bird horse sheep cow elephant bear zebra giraffe mouse rabbit duck chicken fish monkey lion tiger deer goat pig
bicycle bike motorcycle airplane plane bus train truck boat ship van taxi tractor scooter skateboard surfboard
skis snowboard kite ball bat glove racket frisbee
bottle glass wine fork knife spoon bowl plate pan pot kettle jar mug tray
banana apple orange broccoli carrot sandwich pizza donut cake bread cheese egg meat salad fruit vegetable food
chair couch sofa bed table desk bench stool shelf cabinet drawer door window wall floor ceiling roof stairs
lamp light candle mirror picture painting frame poster sign
tv television laptop computer keyboard phone screen monitor remote camera speaker radio microwave oven toaster
sink refrigerator fridge stove faucet towel toilet bathtub shower
book books paper pen pencil notebook letter card box bag backpack suitcase umbrella basket
handbag wallet purse tie hat cap shirt jacket coat dress skirt pants jeans shoe shoes boot sock scarf glasses
sunglasses watch ring necklace bracelet earring belt uniform mask
vase plant flower flowers tree trees grass bush leaf leaves branch garden field forest park
sky cloud clouds sun moon star rain snow water sea ocean lake river beach sand rock rocks stone mountain hill
road street sidewalk path bridge building house tower church castle city fence gate pole wire
hand hands arm arms leg legs foot feet head face eye eyes ear ears nose mouth hair beard neck finger
toy doll teddy puzzle game statue sculpture fountain
wheel tire engine seat window mirror handle button cable cord plug switch
teapot dish napkin bucket barrel can tin box carton
tent blanket pillow rug carpet curtain
map globe compass ladder hammer saw drill tool shovel rope chain lock key
red orange yellow green blue purple pink brown black white gray grey silver gold
small large big little tall short long old new young wooden metal plastic
"""


def _bert_vocab() -> dict[str, int]:
    """WordPiece vocabulary whose special and delimiter ids match bert-base-uncased."""
    vocab: dict[str, int] = {"[PAD]": 0}
    vocab.update({f"[unused{i}]": i + 1 for i in range(99)})
    vocab.update({"[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103})
    vocab.update({f"[unused{i}]": i + 5 for i in range(99, 994)})
    # printable ASCII without upper case from 999 on: "!"=999, "."=1012, "?"=1029, as in bert-base-uncased
    for code in range(33, 127):
        if not chr(code).isupper():
            vocab[chr(code)] = len(vocab)
    for word in _WORDS.split():
        vocab.setdefault(word, len(vocab))
    for letter in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault("##" + letter, len(vocab))
    return vocab


def _clip_vocab() -> dict[str, int]:
    """Byte-level BPE vocabulary without merges: one token per byte, plus its end-of-word form."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({char + "</w>": len(alphabet) + i for i, char in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def save_tiny_grounding_dino(path: str | Path) -> Path:
    """Save a tiny ``GroundingDinoForObjectDetection`` and its ``GroundingDinoProcessor`` into ``path``.

    Swin backbone (embed 16, one block per stage) and a one-layer BERT text encoder (hidden 32), d_model 32,
    20 queries, 256 text positions like the published checkpoints. Images are resized to 256 on the long side.
    Reload with ``AutoProcessor.from_pretrained(path)`` and ``GroundingDinoForObjectDetection.from_pretrained(path)``
    (or ``AutoModelForZeroShotObjectDetection``); see the module docstring for the inference calls.
    """
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _bert_vocab()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 256, "longest_edge": 256})
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=256,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=vocab["[PAD]"],
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # 1 fails to build (`tie_weights_keys` error on bbox_embed)
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        max_text_len=256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_tiny_sam(path: str | Path) -> Path:
    """Save a tiny ``SamModel`` (ViT hidden 32, 2 layers, 256-pixel input) and its ``SamProcessor`` into ``path``.

    Reload with ``AutoProcessor.from_pretrained(path)`` and ``SamModel.from_pretrained(path)`` (or ``AutoModel``).
    Box-prompted batch: ``processor(images=imgs, input_boxes=[[[x0, y0, x1, y1], ...], ...], return_tensors="pt")``,
    ``model(**inputs, multimask_output=True)``, then ``processor.image_processor.post_process_masks(
    outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])``.
    """
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=64,
            output_channels=32,
            image_size=256,
            patch_size=16,
            global_attn_indexes=[1],
            window_size=4,
            num_pos_feats=16,  # must be half the prompt encoder / mask decoder hidden size
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=32, image_size=256, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32
        ),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SamModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    image_processor = SamImageProcessor(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256})
    SamProcessor(image_processor=image_processor).save_pretrained(path)
    return path


def save_tiny_sam2(path: str | Path) -> Path:
    """Save a tiny ``Sam2Model`` (4-stage Hiera, 256-pixel input) and its ``Sam2Processor`` into ``path``.

    Size-controlling keys: ``Sam2HieraDetConfig`` ``hidden_size`` (= first stage width), ``embed_dim_per_stage``,
    ``blocks_per_stage``, ``num_attention_heads_per_stage``, ``window_size_per_stage``, ``global_attention_blocks``,
    ``image_size``; ``Sam2VisionConfig`` ``backbone_channel_list`` (stage widths, last stage first),
    ``backbone_feature_sizes`` (image_size / 4, / 8, / 16) and ``fpn_hidden_size`` (= prompt encoder and mask decoder
    ``hidden_size``). A global-attention block must not be the first block of a stage after the first (its window
    size 0 is divided by the query stride: ``ZeroDivisionError``), and ``image_size / 4`` must be a multiple of
    ``window_size_per_stage[0]``.

    Reload with ``AutoProcessor.from_pretrained(path)`` and ``Sam2Model.from_pretrained(path)`` (or ``AutoModel``).
    Post-process with ``processor.image_processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])``.
    """
    import transformers

    if not all(hasattr(transformers, name) for name in ("Sam2Model", "Sam2Processor", "Sam2Config")):
        raise NotImplementedError(f"transformers {transformers.__version__} has no SAM 2 (Sam2Model/Sam2Processor)")
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2MaskDecoderConfig,
        Sam2Model,
        Sam2Processor,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    size = 256
    widths = [16, 32, 64, 128]
    config = Sam2Config(
        vision_config=Sam2VisionConfig(
            backbone_config=Sam2HieraDetConfig(
                hidden_size=widths[0],
                image_size=[size, size],
                blocks_per_stage=[1, 1, 2, 1],
                embed_dim_per_stage=widths,
                num_attention_heads_per_stage=[1, 1, 2, 2],
                window_size_per_stage=[8, 4, 4, 4],
                global_attention_blocks=[3],
                window_positional_embedding_background_size=[4, 4],
            ),
            backbone_channel_list=widths[::-1],
            backbone_feature_sizes=[[size // 4, size // 4], [size // 8, size // 8], [size // 16, size // 16]],
            fpn_hidden_size=32,
        ),
        prompt_encoder_config=Sam2PromptEncoderConfig(
            hidden_size=32, image_size=size, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=Sam2MaskDecoderConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32
        ),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Sam2Model(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    image_processor = Sam2ImageProcessor(
        size={"height": size, "width": size}, mask_size={"height": size // 4, "width": size // 4}
    )
    Sam2Processor(image_processor=image_processor).save_pretrained(path)
    return path


def save_tiny_inpaint_pipeline(path: str | Path) -> Path:
    """Save a tiny ``StableDiffusionInpaintPipeline`` (9-channel UNet, 64-pixel default size) into ``path``.

    UNet (32/64 channels, in_channels=9), two-block ``AutoencoderKL`` (scale factor 2), two-layer ``CLIPTextModel``
    (hidden 32) with a merge-free byte-level ``CLIPTokenizer``, and the ``PNDMScheduler`` settings of the published
    Stable Diffusion inpainting checkpoints; no safety checker or feature extractor. Reload with
    ``StableDiffusionInpaintPipeline.from_pretrained(path)`` or ``AutoPipelineForInpainting.from_pretrained(path)``.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = _clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=9,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=64,
            norm_num_groups=32,
        )
        text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_tokenizer(extra_special: list[str]) -> Any:
    """Byte-level BPE without merges (one token per byte) plus chat special tokens: no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", *extra_special],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_causal_lm(path: str | Path) -> Path:
    """Save a tiny Qwen2 causal LM with a byte-level BPE tokenizer (one token per byte) and a chat template.

    Random weights: it generates gibberish, which is what the keyword stage's strict reply parsing is tested on.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_tokenizer([])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_llava(path: str | Path, seed: int = 0, image_size: int = 64, patch_size: int = 16) -> Path:
    """Save a tiny LLaVA-1.5-style VLM (CLIP vision tower, 64 px in 16 px patches unless told otherwise: 336 and 14
    give LLaVA-1.5's 576 image tokens; Qwen2 language model) with its processor.

    Loads with ``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``;
    ``processor.apply_chat_template`` renders conversational messages with ``{"type": "image"}`` parts.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_tokenizer(["<image>"])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=CHAT_TEMPLATE,
        vision_feature_select_strategy="default",
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=Qwen2Config(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # another seed: the same architecture, other weights
        model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def save_tiny_qwen2_vl(path: str | Path) -> Path:
    """Save a tiny Qwen2-VL (dynamic-resolution vision patches, M-RoPE) with its processor and chat template.

    Loads with ``AutoModelForImageTextToText`` / ``AutoProcessor`` like LLaVA; its processor also returns
    ``image_grid_thw`` and a per-token ``mm_token_type_ids``.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
    template = CHAT_TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    tokenizer.chat_template = template
    image_processor = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "max_position_embeddings": 4096,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path
