"""keras-hub's Gemma3VisionEncoder, and how keras-hub's Gemma3Backbone puts its soft tokens in the text.

    encoder = minilm.Gemma3VisionEncoder(image_size=16, patch_size=4, num_heads=2, hidden_dim=8,
                                         num_layers=2, intermediate_dim=16, output_dim=8, pool_size=2)
    backbone = minilm.Gemma3Backbone(..., vision_encoder=encoder)
    hidden = backbone({"token_ids": ids, "padding_mask": mask, "images": images,
                       "vision_mask": vision_mask, "vision_indices": vision_indices})

The computation is the SigLIP tower and Gemma 3's multimodal projector of
`minilm/models/gemma3_vision.py` (transformers' layout and names); this file maps keras-hub's
arguments, inputs and weights onto them.

keras-hub's arguments -> transformers' config (`SiglipVisionConfig`, `Gemma3Config`):

    image_size, patch_size        image_size, patch_size
    num_heads, hidden_dim         num_attention_heads, hidden_size
    num_layers, intermediate_dim  num_hidden_layers, intermediate_size
    output_dim                    text_config.hidden_size (the projection's output)
    pool_size                     patches per soft token along a side: mm_tokens_per_image =
                                  ((image_size // patch_size) // pool_size) ** 2
    layer_norm_epsilon            the soft-embedding RMSNorm's epsilon only: keras-hub 0.32 builds its
                                  encoder LayerNorms and post LayerNorm with 1e-6 whatever this says
                                  (transformers uses vision_config.layer_norm_eps for all of them; the
                                  two agree at the default 1e-6)
    dtype                         "bfloat16" gives float32, as keras-hub does for its vision encoder

keras-hub's weights -> transformers' names (V = hidden_dim, p = patch_size, m = intermediate_dim):

    embedding_conv kernel (p, p, 3, V)       vision_tower.vision_model.embeddings.patch_embedding.weight (V, 3, p, p)
                                             [transpose(3, 2, 0, 1): channels-last HWIO -> torch's OIHW]
    position_embedding (patches, V)          ...embeddings.position_embedding.weight        same
    encoder_block_i layer_norm_1/2           ...encoder.layers.i.layer_norm1/2 (LayerNorm: gamma, beta -> weight, bias)
    query/key/value/out_proj kernel (V, V)   ...self_attn.q/k/v/out_proj.weight (V, V), transposed; four unfused
                                             projections with biases, head h = columns h*d .. (h+1)*d - 1
    mlp_dense_1 (V, m), mlp_dense_2 (m, V)   ...mlp.fc1 (m, V), mlp.fc2 (V, m), transposed
    encoder_layer_norm                       vision_tower.vision_model.post_layernorm
    vision_soft_embedding_norm scale (V,)    multi_modal_projector.mm_soft_emb_norm.weight: Gemma's (1 + w) RMSNorm
                                             in both, the same offset from one
    vision_input_projection kernel (V, out)  multi_modal_projector.mm_input_projection_weight (V, out): the same
                                             array, used as x @ W in both

Images: keras-hub takes them channels last, (batch, images_per_prompt, H, W, 3); transformers'
pixel_values are (batch * images_per_prompt, 3, H, W). The values are used as given (keras-hub's
image converter, like transformers' processor, scales them beforehand).
"""

from __future__ import annotations

import numpy as np

from .. import ops
from ..errors import ConfigError, InputError
from ..modeling import PreTrainedModel
from ..models.gemma3_multimodal import READ_RULES, rename
from ..models.gemma3_vision import Gemma3Config, SiglipVisionConfig, multimodal_projector, vision_shapes, vision_tower
from .backbone import check_keras_kwargs

KERAS_ENCODER_EPSILON = 1e-6  # keras-hub 0.32's encoder LayerNorms and post LayerNorm, whatever layer_norm_epsilon says
VISION_ROOTS = ("vision_tower.", "multi_modal_projector.")  # the checkpoint names of the vision encoder's weights


class VisionWeights(PreTrainedModel):
    """The vision tower's and projector's weights under transformers' names (`vision_shapes`): loaded,
    checked (name, shape, dtype, finite) and initialised as every model's weights are."""

    has_head = True  # names are kept as they are

    def parameter_shapes(self):
        return vision_shapes(self.config)

    def init_params(self, seed=0):
        params = super().init_params(seed)  # LayerNorm weights 1, biases 0, matrices N(0, 0.02)
        params["multi_modal_projector.mm_soft_emb_norm.weight"][:] = 0.0  # Gemma's RMSNorm scales by (1 + w)
        return params


class Gemma3VisionEncoder:
    """keras-hub's Gemma3VisionEncoder: images -> soft tokens in the text model's hidden size.

    encoder(images): (batch, images_per_prompt, image_size, image_size, 3)
                  -> (batch * images_per_prompt, num_vision_tokens_per_image, output_dim)
    """

    def __init__(
        self,
        image_size,
        patch_size,
        num_heads,
        hidden_dim,
        num_layers,
        intermediate_dim,
        output_dim,
        pool_size=14,
        layer_norm_epsilon=1e-6,
        dtype=None,
        params=None,
        **kwargs,
    ):
        check_keras_kwargs(type(self), kwargs)
        grid = image_size // patch_size if patch_size else 0
        if not pool_size or pool_size < 1 or grid % pool_size:
            raise ConfigError(
                f"Gemma3VisionEncoder: pool_size={pool_size} must divide the {grid} x {grid} patch grid "
                f"(image_size // patch_size = {image_size} // {patch_size}); keras-hub's pooling would drop "
                "the patches left over, transformers' cannot express it"
            )
        tower = dict(
            hidden_size=hidden_dim,
            intermediate_size=intermediate_dim,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            image_size=image_size,
            patch_size=patch_size,
        )
        # the tower's LayerNorms (keras-hub: always 1e-6) and the projector's RMSNorm (layer_norm_epsilon)
        self.tower_config = SiglipVisionConfig(**tower, layer_norm_eps=KERAS_ENCODER_EPSILON)
        self.config = Gemma3Config(
            text_config={"hidden_size": output_dim},
            vision_config=SiglipVisionConfig(**tower, layer_norm_eps=layer_norm_epsilon),
            mm_tokens_per_image=(grid // pool_size) ** 2,
        )
        self.dtype = "float32" if dtype in (None, "bfloat16") else dtype  # keras-hub: bfloat16 -> float32
        self.weights = VisionWeights(self.config, params=params, dtype=self.dtype)
        self.image_size, self.patch_size, self.num_heads, self.hidden_dim = (
            image_size,
            patch_size,
            num_heads,
            hidden_dim,
        )
        self.num_layers, self.intermediate_dim, self.output_dim = num_layers, intermediate_dim, output_dim
        self.pool_size, self.layer_norm_epsilon = pool_size, layer_norm_epsilon
        self.num_vision_tokens_per_image = self.config.mm_tokens_per_image

    def get_config(self):
        """keras-hub's get_config() (without keras' name and trainable): from_config rebuilds the encoder."""
        return {
            "dtype": self.dtype,
            "num_heads": self.num_heads,
            "hidden_dim": self.hidden_dim,
            "num_layers": self.num_layers,
            "intermediate_dim": self.intermediate_dim,
            "output_dim": self.output_dim,
            "pool_size": self.pool_size,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }

    @classmethod
    def from_config(cls, config, params=None):
        return cls(**config, params=params)

    @staticmethod
    def keras_args(c):
        """keras-hub's arguments for a Gemma3Config's vision tower and projector; ConfigError for what
        they cannot say."""
        v = c.vision_config
        problems = []
        if v.layer_norm_eps != KERAS_ENCODER_EPSILON:
            problems.append(f"vision layer_norm_eps={v.layer_norm_eps} (keras-hub's encoder LayerNorms use 1e-6)")
        if v.num_channels != 3:
            problems.append(f"num_channels={v.num_channels} (keras-hub: RGB images)")
        if v.hidden_act != "gelu_pytorch_tanh":
            problems.append(f"hidden_act={v.hidden_act!r} (keras-hub: GELU, tanh approximation)")
        if problems:
            raise ConfigError("Gemma3VisionEncoder cannot express this vision config: " + "; ".join(problems))
        return dict(
            image_size=v.image_size,
            patch_size=v.patch_size,
            num_heads=v.num_attention_heads,
            hidden_dim=v.hidden_size,
            num_layers=v.num_hidden_layers,
            intermediate_dim=v.intermediate_size,
            output_dim=c.text_config.hidden_size,
            pool_size=c.pool_kernel,
            layer_norm_epsilon=v.layer_norm_eps,
        )

    def count_params(self):
        return self.weights.num_parameters()

    def state_dict(self):
        """{transformers name: array} of every weight (`vision_tower.vision_model.*`, `multi_modal_projector.*`)."""
        return self.weights.state_dict()

    def to_device(self):
        self.weights.to_device()
        return self

    # -- calling --------------------------------------------------------------------------

    def pixel_values(self, images):
        """keras-hub's images (batch, images_per_prompt, H, W, 3) -> transformers' (batch * images, 3, H, W)."""
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, self.config.vision_config.num_channels)
        if images.ndim != 5 or images.shape[2:] != expected:
            raise InputError(
                f"images must have shape (batch, images_per_prompt, image_size, image_size, channels) = "
                f"(batch, images, {expected[0]}, {expected[1]}, {expected[2]}), channels last; got {images.shape}"
            )
        if images.dtype.kind not in "fiu":
            raise InputError(f"images must hold numbers; got dtype {images.dtype}")
        flat = images.reshape((-1,) + images.shape[2:]).astype(
            self.weights.dtype, copy=False
        )  # (batch * images, H, W, 3)
        return flat.transpose(0, 3, 1, 2)  # (batch * images, 3, H, W)

    def features(self, images):
        """The tower's output before pooling (keras-hub's `image_encoder` layer).
        (batch, images, H, W, 3) -> (batch * images, num_patches, hidden_dim)"""
        p = self.weights.params.vision_tower.vision_model
        return vision_tower(self.pixel_values(images), p, self.tower_config)

    def __call__(self, images):
        """(batch, images, H, W, 3) -> (batch * images, num_vision_tokens_per_image, output_dim)"""
        return multimodal_projector(self.features(images), self.weights.params.multi_modal_projector, self.config)


# minilm's multimodal layout (`gemma3_multimodal.READ_RULES`) -> a keras preset's: text weights as the
# text model names them, vision weights under transformers' vision names
PRESET_RULES = (
    ("model.language_model.", ""),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def split_vision_params(params):
    """(text weights, vision weights) of one flat {name: array}, or (None, None). Names of every
    multimodal checkpoint layout (released: language_model.model.*, vision_tower.vision_model.*;
    transformers 5's) are first brought to a keras preset's: text weights bare (`layers.0...`),
    vision weights under `vision_tower.vision_model.*` and `multi_modal_projector.*`."""
    if params is None:
        return None, None
    params = {rename(rename(k, READ_RULES), PRESET_RULES): v for k, v in params.items()}
    vision = {k: v for k, v in params.items() if k.startswith(VISION_ROOTS)}
    return {k: v for k, v in params.items() if k not in vision}, vision


def vision_encoder_from_config(value, params=None):
    """A Gemma3VisionEncoder from itself, or from its serialised form {"class_name": "Gemma3VisionEncoder",
    "config": {...}} (a preset's config.json, `Gemma3Backbone.get_config()`), with `params` when given."""
    if isinstance(value, Gemma3VisionEncoder):
        if params:
            raise ConfigError(
                "Gemma3Backbone: the vision encoder has its own weights; pass its config, not an instance"
            )
        return value
    if isinstance(value, dict) and value.get("class_name") == "Gemma3VisionEncoder" and "config" in value:
        return Gemma3VisionEncoder.from_config(value["config"], params=params or None)
    raise ConfigError(
        f"vision_encoder must be a minilm.Gemma3VisionEncoder or its config "
        f'{{"class_name": "Gemma3VisionEncoder", "config": {{...}}}}; got {type(value).__name__}'
    )


# ---------------------------------------------------------------------------------------------
# Placing the soft tokens: keras-hub's Gemma3InterleaveEmbeddings
# ---------------------------------------------------------------------------------------------


def check_vision_inputs(images, vision_mask, vision_indices, token_ids, tokens_per_image):
    """keras-hub's vision inputs, checked against each other; InputError naming what does not fit.

    images (batch, images_per_prompt, H, W, 3), vision_mask (batch, seq) 0/1,
    vision_indices (batch, images_per_prompt * tokens_per_image) positions in [0, seq), 0 for an
    empty image slot, no position twice; every position vision_mask marks gets a soft token. (A soft
    token outside vision_mask is allowed, as in keras-hub: it then attends causally.)"""
    batch, seq = np.shape(token_ids)
    images, vision_mask = np.asarray(images), np.asarray(vision_mask)
    vision_indices = np.asarray(vision_indices)
    if images.ndim != 5 or images.shape[0] != batch:
        raise InputError(f"images must have shape (batch={batch}, images_per_prompt, H, W, 3); got {images.shape}")
    if vision_mask.shape != (batch, seq):
        raise InputError(f"vision_mask must have the shape of token_ids {(batch, seq)}; got {vision_mask.shape}")
    slots = images.shape[1] * tokens_per_image
    if vision_indices.shape != (batch, slots):
        raise InputError(
            f"vision_indices must have shape (batch, images_per_prompt * {tokens_per_image} soft tokens) = "
            f"({batch}, {slots}); got {vision_indices.shape}"
        )
    if vision_indices.dtype.kind not in "iu" or (
        vision_indices.size and not 0 <= vision_indices.min() <= vision_indices.max() < seq
    ):
        raise InputError(f"vision_indices must be integer positions in [0, {seq})")
    if not np.isin(vision_mask, (0, 1)).all():
        raise InputError("vision_mask must hold only 0 (text) and 1 (image token)")
    if vision_mask[:, 0].any():
        raise InputError(
            "vision_mask marks position 0 as an image token; keras-hub keeps index 0 for empty image slots "
            "and puts the text embedding back there"
        )
    for row in range(batch):
        named = vision_indices[row][vision_indices[row] > 0]
        if np.unique(named).size != named.size:
            raise InputError(f"row {row}: vision_indices names a position twice; each soft token needs its own")
        unfilled = np.setdiff1d(np.flatnonzero(vision_mask[row]), named)
        if unfilled.size:
            raise InputError(
                f"row {row}: vision_mask marks positions {unfilled.tolist()[:8]} as image tokens but vision_indices "
                "puts no soft token there"
            )
    return images, vision_mask, vision_indices


def interleave_embeddings(image_embeddings, text_embeddings, vision_indices):
    """keras-hub's Gemma3InterleaveEmbeddings: soft token k of image j of row b replaces the text
    embedding at vision_indices[b, j * tokens_per_image + k]. Empty image slots point at position 0,
    whose text embedding is put back afterwards.

    image_embeddings (batch * images, tokens_per_image, hidden), text_embeddings (batch, seq, hidden),
    vision_indices (batch, images * tokens_per_image) -> (batch, seq, hidden)"""
    batch, _, hidden = text_embeddings.shape
    out = text_embeddings.copy()
    rows = ops.like(np.repeat(np.arange(batch), vision_indices.shape[1]), out)  # (batch * images * tokens,)
    columns = ops.like(np.asarray(vision_indices).reshape(-1), out)  # where each soft token goes
    out[rows, columns] = image_embeddings.reshape(-1, hidden).astype(out.dtype, copy=False)
    out[:, 0] = text_embeddings[:, 0]  # index 0 was the empty slots' target
    return out
