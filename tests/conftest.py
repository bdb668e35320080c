"""Tiny random Stable Diffusion pipelines, built and saved with PyTorch diffusers and transformers."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Four CPU devices for the data-parallel tests; XLA reads this once, when JAX starts.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
# One compilation cache for this process and the erase runs it starts as subprocesses: the same
# step compiles once per test session instead of once per process.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="esd-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from esd_jax.tokenizer import make_clip_tokenizer  # noqa: E402

WORDS = ["a", "photo", "of", "red", "green", "circle", "van", "gogh", "painting"]

SHAPES = {
    # int head count, conv proj_in/out, quick_gelu: the SD 1.x family.
    "sd1": dict(
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        ),
        text=dict(hidden_act="quick_gelu", pad_token="<|endoftext|>"),
    ),
    # per-block head counts, linear projections, upcast attention, gelu: the SD 2.x family.
    "sd2": dict(
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=8,
            use_linear_projection=True,
            upcast_attention=True,
        ),
        text=dict(hidden_act="gelu", pad_token="!"),
    ),
}


def pytest_configure(config):
    """The suite's models are tiny, so compiling them is most of its time, and unoptimised CPU code
    (LLVM -O0) compiles in about two thirds of it; every tolerance holds at either level. The slow set
    (`-m slow`) keeps XLA's default level for its long loops: the attack's search ran 2.6 times as long
    unoptimised."""
    import jax._src.xla_bridge as xla_bridge

    assert not xla_bridge.backends_are_initialized(), "XLA reads XLA_FLAGS once, when its backends start"
    if config.option.markexpr == "not slow":
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Randomises every parameter, norms included, so no default init (ones, zeros) hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def build_torch_pipeline(shape: str):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = SHAPES[shape]
    torch.manual_seed(0)
    tokenizer = make_clip_tokenizer(WORDS, max_length=16, pad_token=spec["text"]["pad_token"])
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            hidden_act=spec["text"]["hidden_act"],
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for i, m in enumerate((unet, vae, text_encoder)):
        perturb(m, seed=i)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# SDXL's shape: a first block without attention, per-block transformer depths, two text encoders whose
# penultimate states are joined (32 + 48 = cross_attention_dim 80; of different widths, as diffusers'
# single-file loader tells SDXL's encoders apart by width), and the added "text_time" embedding of the
# second encoder's projection (32) and six time ids of 8 sinusoids each (32 + 48 = 80).
SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=80,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=8,
)


def tiny_text_config(tokenizer, hidden_act: str, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act=hidden_act,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_torch_sdxl_pipeline():
    """A tiny random StableDiffusionXLPipeline: CLIP-L-like and bigG-like encoders, Euler, SDXL's VAE scale."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = make_clip_tokenizer(WORDS, max_length=16, pad_token="<|endoftext|>")
    tokenizer_2 = make_clip_tokenizer(WORDS, max_length=16, pad_token="!")
    unet = UNet2DConditionModel(**SDXL_UNET)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, "gelu", hidden_size=48))
    for i, m in enumerate((unet, vae, text_encoder, text_encoder_2)):
        perturb(m, seed=10 + i)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


@pytest.fixture(scope="session")
def sdxl_pipeline(tmp_path_factory):
    """(folder, torch pipeline) of the tiny SDXL pipeline, saved once per session."""
    pipe = build_torch_sdxl_pipeline()
    folder = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.fixture(scope="session", params=sorted(SHAPES))
def tiny_pipeline(request, tmp_path_factory):
    """(folder, torch pipeline) for each tiny shape, saved once per session."""
    pipe = build_torch_pipeline(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    pipe.save_pretrained(folder)
    return folder, pipe


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """The SD1-shaped tiny pipeline as a diffusers folder."""
    folder = tmp_path_factory.mktemp("sd1-folder")
    build_torch_pipeline("sd1").save_pretrained(folder)
    return folder
