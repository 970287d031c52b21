"""Models nobody here wrote: architectures built from torch's, transformers' and
torchvision's own classes, tiny configs, random weights under a seed, with seeded inputs to
judge them on.

``ZOO[name]`` is the space file a user would pick for model ``name``; its factory and data are
``zoo_models:build_<name>`` and ``zoo_models:data_<name>``, as a config names them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

SEED = 0
BATCHES, BATCH = 4, 8
VOCAB, LENGTH = 256, 16


def _torchvision() -> Any:
    """torchvision's model code. The registries here only carry torchvision wheels built for
    CUDA; their compiled operators (detection's nms) fail to load beside a CPU torch, and
    importing the package then fails on registering those operators. Declaring the two whose
    registration is unguarded lets the pure-Python model classes import; no model here calls
    them."""
    import importlib

    if not hasattr(torch.ops.torchvision, "nms"):
        try:
            return importlib.import_module("torchvision")
        except RuntimeError:
            library = torch.library.Library("torchvision", "DEF")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARIES.append(library)  # dropping it would remove the definitions
    return importlib.import_module("torchvision")


_LIBRARIES: list[Any] = []


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(SEED)
    return build().eval()


def _images(size: int = 32) -> list[tuple[torch.Tensor, None]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    return [(torch.randn(BATCH, 3, size, size, generator=generator), None) for _ in range(BATCHES)]


def _with_statistics(model: nn.Module, size: int = 32) -> nn.Module:
    """BatchNorm running statistics from seeded images, as training would leave them."""
    model.train()
    generator = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, size, size, generator=generator))
    return model.eval()


def _tokens(**extra: Any) -> list[tuple[dict[str, torch.Tensor], None]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    batches = []
    for _ in range(BATCHES):
        ids = torch.randint(4, VOCAB, (BATCH, LENGTH), generator=generator)
        mask = torch.ones_like(ids)
        mask[: BATCH // 2, LENGTH * 3 // 4 :] = 0  # some padded sentences
        batches.append(({"input_ids": ids, "attention_mask": mask, **extra}, None))
    return batches


# --- torchvision -----------------------------------------------------------------------------


def build_resnet18() -> nn.Module:
    """resnet18's class with one BasicBlock per stage where it has two (a ResNet-10: every
    kind of layer it has, including the strided shortcuts, in 13 layers of its 21)."""
    tv = _torchvision()
    block = tv.models.resnet.BasicBlock
    return _with_statistics(_seeded(lambda: tv.models.ResNet(block, [1, 1, 1, 1], num_classes=10)))


def build_resnet18_full() -> nn.Module:
    """torchvision's resnet18 as published, for benchmarks/studies."""
    tv = _torchvision()
    return _with_statistics(_seeded(lambda: tv.models.resnet18(num_classes=10)))


def build_mobilenet_v2() -> nn.Module:
    """MobileNetV2's first four stages, a block less where one repeats: every kind of block it
    has in 20 layers of its 53, so the sensitivity pass probes a third as many (CI's time)."""
    tv = _torchvision()
    stages = [[1, 16, 1, 1], [6, 24, 1, 2], [6, 32, 2, 2], [6, 64, 2, 2]]
    return _with_statistics(
        _seeded(lambda: tv.models.MobileNetV2(num_classes=10, inverted_residual_setting=stages))
    )


def build_mobilenet_v2_full() -> nn.Module:
    """torchvision's mobilenet_v2 as published (53 layers), for benchmarks/studies."""
    tv = _torchvision()
    return _with_statistics(_seeded(lambda: tv.models.mobilenet_v2(num_classes=10)))


def build_shufflenet() -> nn.Module:
    """shufflenet_v2_x0_5's widths with two units per stage instead of 4, 8 and 4 (channel
    split, shuffle and both unit kinds in 27 layers of its 57)."""
    tv = _torchvision()
    return _with_statistics(
        _seeded(lambda: tv.models.ShuffleNetV2([2, 2, 2], [24, 48, 96, 192, 1024], num_classes=10))
    )


def build_mobilenet_v3() -> nn.Module:
    """mobilenet_v3_small's first six blocks (ReLU and hardswish, with and without
    squeeze-excitation) and its head: 29 layers of its 54."""
    tv = _torchvision()
    blocks, last_channel = tv.models.mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small")
    return _with_statistics(
        _seeded(lambda: tv.models.MobileNetV3(blocks[:6], last_channel, num_classes=10))
    )


def build_efficientnet() -> nn.Module:
    """efficientnet_b0's first five stages at half width, one or two blocks each: 37 layers of
    its 82."""
    tv = _torchvision()
    b0 = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2)]
    b0 += [(6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3)]
    config = tv.models.efficientnet.MBConvConfig
    stages = [config(*stage, width_mult=0.5, depth_mult=0.34) for stage in b0]
    return _with_statistics(
        _seeded(lambda: tv.models.EfficientNet(stages, dropout=0.2, num_classes=10))
    )


def build_squeezenet() -> nn.Module:
    tv = _torchvision()
    return _with_statistics(_seeded(lambda: tv.models.squeezenet1_1(num_classes=10)))


def build_regnet() -> nn.Module:
    """RegNetY (grouped convolutions, squeeze-excitation) drawn from the paper's RegNetY-200MF
    parameters at depth 6 instead of 13: 35 layers, where regnet_y_400mf has 86."""
    tv = _torchvision()
    params = tv.models.regnet.BlockParams.from_init_params(
        depth=6, w_0=24, w_a=36.44, w_m=2.49, group_width=8, se_ratio=0.25
    )
    return _with_statistics(_seeded(lambda: tv.models.RegNet(params, num_classes=10)))


def build_vit() -> nn.Module:
    """torchvision's ViT; its head starts at zero (every output the same), so it is drawn
    at random like the rest."""
    tv = _torchvision()
    model = _seeded(
        lambda: tv.models.VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=2,
            num_heads=4,
            hidden_dim=64,
            mlp_dim=128,
            num_classes=10,
        )
    )
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def build_densenet() -> nn.Module:
    """A DenseNet (densenet121's class): every layer's input the concatenation of all before
    it in its block, two blocks of three layers at growth 8 instead of four of 6-24 at 32."""
    tv = _torchvision()
    return _with_statistics(
        _seeded(
            lambda: tv.models.DenseNet(
                growth_rate=8, block_config=(3, 3), num_init_features=16, bn_size=2, num_classes=10
            )
        )
    )


def build_convnext() -> nn.Module:
    """ConvNeXt's blocks (7x7 depthwise convolution, channels-last LayerNorm, an MLP of
    Linears, a learned per-channel layer scale) at two stages of one block each."""
    tv = _torchvision()
    stage = tv.models.convnext.CNBlockConfig
    setting = [stage(16, 32, 1), stage(32, None, 1)]
    return _seeded(lambda: tv.models.ConvNeXt(setting, num_classes=10))


def build_convnext_full() -> nn.Module:
    """torchvision's convnext_tiny as published (28M parameters), for benchmarks/studies."""
    tv = _torchvision()
    return _seeded(lambda: tv.models.convnext_tiny(num_classes=10))


def data_convnext_full() -> list[tuple[torch.Tensor, None]]:
    return _images(96)


data_resnet18 = data_mobilenet_v2 = data_shufflenet = data_vit = _images
data_mobilenet_v3 = data_efficientnet = data_squeezenet = data_regnet = _images
data_densenet = data_convnext = _images


# --- torch's own layers ------------------------------------------------------------------------


def build_torch_vit() -> nn.Module:
    """A ViT from ``nn.TransformerEncoder``: ``nn.MultiheadAttention`` reads its ``out_proj``'s
    weight instead of calling it, and the encoder's fast path reads every layer's."""

    class TorchViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patches = nn.Conv2d(3, 64, kernel_size=8, stride=8)
            self.position = nn.Parameter(torch.randn(1, 16, 64) * 0.02)
            layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patches(x).flatten(2).transpose(1, 2) + self.position
            return self.head(self.encoder(tokens).mean(dim=1))

    return _seeded(TorchViT)


data_torch_vit = _images


# --- transformers ----------------------------------------------------------------------------


def build_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _seeded(lambda: GPT2LMHeadModel(config))


def build_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return _seeded(lambda: LlamaForCausalLM(config))


def build_bert() -> nn.Module:
    from transformers import BertModel

    return _seeded(lambda: BertModel(_bert_config(), add_pooling_layer=False))


def build_bert_mlm() -> nn.Module:
    from transformers import BertForMaskedLM

    return _seeded(lambda: BertForMaskedLM(_bert_config()))


def _bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )


def build_distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64
    )
    return _seeded(lambda: DistilBertModel(config))


def build_t5() -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    return _seeded(lambda: T5EncoderModel(config))


def build_bart() -> nn.Module:
    from transformers import BartConfig, BartModel

    config = BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
    )
    return _seeded(lambda: BartModel(config))


def build_hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return _seeded(lambda: ViTModel(config, add_pooling_layer=False))


def build_whisper() -> nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        max_source_positions=32,
        vocab_size=VOCAB,
    )
    return _seeded(lambda: WhisperEncoder(config))


def build_mixtral() -> nn.Module:
    """A mixture of experts (Mixtral's class): a router picks 2 of 4 experts per token, whose
    weights transformers holds as 3-D tensors of one module, not as Linears."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return _seeded(lambda: MixtralForCausalLM(config))


def build_mamba() -> nn.Module:
    """A state-space model (Mamba's class): a selective scan whose projections are Linears,
    with a depthwise causal convolution and the state matrix as parameters of the mixer."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2
    )
    return _seeded(lambda: MambaForCausalLM(config))


def build_wav2vec2() -> nn.Module:
    """A speech encoder (wav2vec 2.0's class): a convolutional feature encoder on raw audio,
    and a positional convolution whose kernel is a weight-norm parametrization."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        conv_dim=(32, 32, 32),
        conv_stride=(5, 2, 2),
        conv_kernel=(10, 3, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=VOCAB,
    )
    return _seeded(lambda: Wav2Vec2Model(config))


def build_deberta() -> nn.Module:
    """Relative-position attention (DeBERTa-v2's class): content and position attend to each
    other through projections of shared relative-position embeddings."""
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        relative_attention=True,
        position_buckets=16,
        max_relative_positions=32,
        pos_att_type=["p2c", "c2p"],
    )
    return _seeded(lambda: DebertaV2Model(config))


def build_phi3() -> nn.Module:
    """Fused projections (Phi-3's class): one Linear makes query, key and value (grouped-query),
    one makes the MLP's gate and up projections."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _seeded(lambda: Phi3ForCausalLM(config))


class Recurrent(nn.Module):
    """torch's recurrent layers as a user stacks them: token embeddings, a two-layer
    bidirectional LSTM, a GRU over its outputs, a classifier on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        self.lstm = nn.LSTM(64, 64, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(128, 96, batch_first=True)
        self.head = nn.Linear(96, 10)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embed(input_ids))
        states, _ = self.gru(states)
        return self.head(states[:, -1])


def build_recurrent() -> nn.Module:
    return _seeded(Recurrent)


def data_recurrent() -> list[tuple[torch.Tensor, None]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    return [
        (torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator), None)
        for _ in range(BATCHES)
    ]


data_gpt2 = data_llama = data_bert = data_bert_mlm = data_distilbert = data_t5 = _tokens
data_bart = data_mixtral = data_deberta = data_phi3 = _tokens


def data_mamba() -> list[tuple[torch.Tensor, None]]:
    return [(batch["input_ids"], None) for batch, _ in _tokens()]


def data_wav2vec2() -> list[tuple[dict[str, torch.Tensor], None]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    return [
        ({"input_values": torch.randn(BATCH, 1600, generator=generator)}, None)
        for _ in range(BATCHES)
    ]


def data_hf_vit() -> list[tuple[dict[str, torch.Tensor], None]]:
    return [({"pixel_values": x}, None) for x, _ in _images()]


def data_whisper() -> list[tuple[dict[str, torch.Tensor], None]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    return [
        ({"input_features": torch.randn(BATCH, 16, 64, generator=generator)}, None)
        for _ in range(BATCHES)
    ]


CNN, TRANSFORMER = "default.yaml", "transformer.yaml"
TORCHVISION: dict[str, str] = {
    "resnet18": CNN,
    "mobilenet_v2": CNN,
    "shufflenet": CNN,
    "mobilenet_v3": CNN,
    "efficientnet": CNN,
    "squeezenet": CNN,
    "regnet": CNN,
    "vit": TRANSFORMER,
    "densenet": CNN,
    "convnext": CNN,
}
"""torchvision's models: in ``test_zoo.py`` given ``AUTOSQUEEZE_TEST_TORCHVISION`` (a folder
holding torchvision, out of the environment: the registries here carry only its CUDA build,
which breaks ``import transformers`` beside a CPU torch), and in ``benchmarks/zoo.py``."""
ZOO: dict[str, str] = {
    "torch_vit": TRANSFORMER,
    "gpt2": TRANSFORMER,
    "llama": TRANSFORMER,
    "bert": TRANSFORMER,
    "bert_mlm": TRANSFORMER,
    "distilbert": TRANSFORMER,
    "t5": TRANSFORMER,
    "bart": TRANSFORMER,
    "hf_vit": TRANSFORMER,
    "whisper": TRANSFORMER,
    "recurrent": TRANSFORMER,
    "mixtral": TRANSFORMER,
    "mamba": TRANSFORMER,
    "wav2vec2": TRANSFORMER,
    "deberta": TRANSFORMER,
    "phi3": TRANSFORMER,
}
"""model name -> the space file (in ``search_spaces/``) a user would pick for it."""
