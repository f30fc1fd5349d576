"""BertConfig: the field names and defaults of transformers' BertConfig, read from and written to
the same config.json."""
import copy
import json
import os

_ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish", "tanh")


class BertConfig:
    model_type = "bert"

    def __init__(self, vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                 attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                 initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
                 position_embedding_type="absolute", use_cache=True, classifier_dropout=None,
                 tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.pad_token_id = pad_token_id
        self.position_embedding_type = position_embedding_type
        self.use_cache = use_cache
        self.classifier_dropout = classifier_dropout
        self.tie_word_embeddings = tie_word_embeddings
        # Anything else transformers wrote (architectures, dtype, id2label, ...) is kept and saved.
        kwargs.pop("model_type", None)
        self.extra = kwargs
        self.validate()

    def validate(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not supported; expected one of {_ACTIVATIONS}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"BertConfig.position_embedding_type {self.position_embedding_type!r} is not "
                             "supported; fastbert implements 'absolute' (BERT's)")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self):
        d = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "extra"}
        d.update(copy.deepcopy(self.extra))
        d["model_type"] = self.model_type
        return d

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    def to_json_string(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path):
        with open(path, "w") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path):
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise OSError(f"no config file at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"{path} describes a {model_type!r} model; fastbert reads 'bert' configs")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"{path}: {e}") from None

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, "config.json"))

    @classmethod
    def from_pretrained(cls, path):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise OSError(f"no config.json at {path}: expected a model directory written by "
                          "save_pretrained (fastbert or transformers)")
        return cls.from_json_file(path)

    def __eq__(self, other):
        return isinstance(other, BertConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"BertConfig {self.to_json_string()}"


# Model sizes of the BERT paper and Turc et al. (2019), "Well-Read Students Learn Better".
PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return BertConfig(**{**PRESETS[name], **overrides})
