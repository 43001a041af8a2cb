"""A small byte-level BPE tokenizer trained on the fly, with Qwen-style special tokens and chat template."""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, Nano-vLLM. Introduce yourself and list all prime numbers within 100.",
    "Paged attention stores keys and values in fixed-size blocks of the cache.",
    "Un café, s'il vous plaît. Ça coûte combien ? 你好，世界。こんにちは。🙂",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time, a small engine served many requests at once, token by token.",
]


def train_tokenizer(path: str, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train, save to path (tokenizer.json etc.) and return the tokenizer. Token ids: the three special
    tokens first (so <|im_end|> is id 2), then bytes and merges; all ids < vocab_size."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast
