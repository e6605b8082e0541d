"""The CNN-LSTM "merge" captioner of the study, as graphs that share one set of weights.

    image features -> Dropout -> Dense(units, relu)                 = image projection (B, U)
    caption tokens -> Embedding -> Dropout -> LSTM(units)           = text state       (B, U)
    add -> Dense(units, relu) -> Dense(vocab)                       = next-word logits (B, V)

Graphs over the same layers:
  training: teacher forcing, K right-padded captions per image (B, K, T) -> the logits of every
            real next token (M, V): position t predicts token t+1, and the positions whose next
            token is padding are dropped before the output layer (most of a batch's positions
            at Flickr8k's lengths; at a vocabulary of thousands that layer is most of the work)
  prefix:   the study's graph, a left-padded prefix (B, T) -> logits for the next word (B, V)
  step:     one LSTMCell step (token, h, c, image projection) -> (logits, h', c'); converts to
            TFLite with a dynamic batch (a Keras LSTM layer does not, docs/stack.md)
  encoder:  preprocessed images -> image projection (backbone + the Dense above)

The Embedding is built with mask_zero=False: captions are right-padded, the LSTM reads left to
right, so padding never reaches a real position, and the loss ignores padded targets. (A mask
would flow into the Dense layers and break tfmot's quantization wrappers.) The prefix graph,
left-padded like the study's, passes an explicit mask to the LSTM instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from capfleet.model.encoders import build_encoder, encoder_info


@dataclass(frozen=True)
class CaptionerConfig:
    """Everything needed to rebuild the captioner; saved in every model manifest."""

    encoder: str
    vocab_size: int
    max_len: int  # caption length in tokens, startseq and endseq included
    units: int = 256
    embed_dim: int = 256
    dropout: float = 0.5

    def __post_init__(self) -> None:
        encoder_info(self.encoder)  # an unknown encoder is an error here, not later
        assert self.vocab_size > 4, "vocabulary must hold more than the four special tokens"
        assert self.max_len >= 3, "captions need startseq, a word and endseq"
        assert self.units > 0 and self.embed_dim > 0 and 0.0 <= self.dropout < 1.0

    @property
    def feature_dim(self) -> int:
        return encoder_info(self.encoder).feature_dim

    def to_dict(self) -> dict:
        return asdict(self)


class Captioner:
    """The decoder's layers, built once, and the graphs that share them."""

    def __init__(self, config: CaptionerConfig, encoder=None):
        import tf_keras as keras

        self.config = config
        self.keras = keras
        layers = keras.layers
        u = config.units
        self.img_dropout = layers.Dropout(config.dropout, name="img_dropout")
        self.img_dense = layers.Dense(u, activation="relu", name="img_proj")
        self.embedding = layers.Embedding(config.vocab_size, config.embed_dim, name="embedding")
        self.txt_dropout = layers.Dropout(config.dropout, name="txt_dropout")
        self.lstm = layers.LSTM(u, return_sequences=True, name="lstm")
        self.merge_add = layers.Add(name="add")
        self.merge_dense = layers.Dense(u, activation="relu", name="merge")
        self.out_dense = layers.Dense(config.vocab_size, name="logits")
        # Trainable encoders (the small CNN) are part of the training graph; frozen backbones
        # are not: their features are computed once and fed in.
        self.trainable_encoder = encoder_info(config.encoder).trainable
        self.encoder = encoder
        if self.trainable_encoder and self.encoder is None:
            self.encoder = build_encoder(config.encoder)
        self.training_model = self._training_graph()

    # layer attribute -> the layer's name in the training graph
    LAYERS = {
        "img_dropout": "img_dropout",
        "img_dense": "img_proj",
        "embedding": "embedding",
        "txt_dropout": "txt_dropout",
        "lstm": "lstm",
        "merge_add": "add",
        "merge_dense": "merge",
        "out_dense": "logits",
    }

    def rebind(self, model) -> None:
        """Use the layers of `model`, a copy of the training graph whose layers may be wrapped
        (tfmot's quantize_apply names a wrapped layer "quant_<name>"), for every graph built
        from now on. This is how a QAT model becomes step and encoder graphs for export."""
        by_name = {layer.name: layer for layer in model.layers}
        for attr, name in self.LAYERS.items():
            layer = by_name.get(f"quant_{name}", by_name.get(name))
            if layer is None:
                raise ValueError(f"{model.name} has no layer {name!r}")
            setattr(self, attr, layer)
        if self.trainable_encoder:
            self.encoder = by_name[self.encoder.name]
        self.training_model = model

    # -- pieces ------------------------------------------------------------------------
    def _project(self, features):
        return self.img_dense(self.img_dropout(features))  # (B, U)

    def _head(self, text_state, img_proj):
        merged = self.merge_add([text_state, img_proj])
        return self.out_dense(self.merge_dense(merged))  # (B, [T,] V)

    def _image_input(self):
        k = self.keras
        if self.trainable_encoder:
            s = encoder_info(self.config.encoder).input_size
            inp = k.Input((s, s, 3), name="image")
            return inp, self.encoder(inp)
        inp = k.Input((self.config.feature_dim,), name="features")
        return inp, inp

    # -- graphs --------------------------------------------------------------------------
    def _training_graph(self):
        """(images or features (B, ...), captions (B, K, T)) -> logits (M, V) of the M real
        next tokens, in the order of `next_tokens(captions)`.

        K captions per image share one encoder pass: the CNN runs once per image, not once
        per caption (5x less encoder work on Flickr8k's five captions).
        """
        import tensorflow as tf

        k = self.keras
        img_in, feats = self._image_input()
        tokens = k.Input((None, None), dtype="int32", name="tokens")  # (B, K, T) right-padded
        shape = tf.shape(tokens)
        flat = tf.reshape(tokens, (-1, shape[2]))  # (B*K, T)
        seq = self.lstm(self.txt_dropout(self.embedding(flat[:, :-1])))  # (B*K, T-1, U)
        img = tf.repeat(self._project(feats), shape[1], axis=0)[:, None, :]  # (B*K, 1, U)
        merged = self.merge_add([seq, img])  # (B*K, T-1, U)
        real = tf.boolean_mask(merged, tf.not_equal(flat[:, 1:], 0))  # (M, U)
        logits = self.out_dense(self.merge_dense(real))  # (M, V)
        return k.Model([img_in, tokens], logits, name="captioner_training")

    @staticmethod
    def next_tokens(tokens):
        """Captions (B, K, T) -> the real next tokens (M,) the training graph's logits predict."""
        import numpy as np

        nxt = np.asarray(tokens)[..., 1:]
        return nxt[nxt != 0]

    def prefix_model(self):
        """The study's graph: (features or images, left-padded prefix) -> next-word logits."""
        import tensorflow as tf

        k = self.keras
        img_in, feats = self._image_input()
        prefix = k.Input((self.config.max_len,), dtype="int32", name="prefix")  # (B, T)
        mask = k.layers.Lambda(lambda t: tf.not_equal(t, 0), name="prefix_mask")(prefix)
        seq = self.lstm(self.txt_dropout(self.embedding(prefix)), mask=mask)  # (B, T, U)
        last = seq[:, -1, :]  # left padding: the last position is always a real token
        return k.Model([img_in, prefix], self._head(last, self._project(feats)), name="prefix")

    def step_model(self):
        """One decoding step: (token (B,), h, c, img_proj (B, U)) -> (logits, h', c')."""
        k = self.keras
        u = self.config.units
        token = k.Input((), dtype="int32", name="token")
        h = k.Input((u,), name="h")
        c = k.Input((u,), name="c")
        img_proj = k.Input((u,), name="img_proj")
        x = self.txt_dropout(self.embedding(token))  # (B, E)
        out, (h2, c2) = self.lstm.cell(x, [h, c])  # (B, U): the LSTM layer's own weights
        logits = self._head(out, img_proj)
        return k.Model([token, h, c, img_proj], [logits, h2, c2], name="decoder_step")

    def encoder_model(self, backbone=None):
        """Preprocessed images -> image projection (B, U): the bundle's encoder."""
        k = self.keras
        backbone = backbone if backbone is not None else self.encoder
        assert backbone is not None, "a frozen encoder's backbone must be passed in"
        s = encoder_info(self.config.encoder).input_size
        images = k.Input((s, s, 3), name="image")
        return k.Model(images, self._project(backbone(images)), name="encoder")

    def features_model(self):
        """Features (B, F) -> image projection (B, U), for decoding from cached features."""
        k = self.keras
        feats = k.Input((self.config.feature_dim,), name="features")
        return k.Model(feats, self._project(feats), name="projection")
