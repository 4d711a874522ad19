"""A byte-level tokenizer built in code, so tiny models need no download.

Every UTF-8 byte is one token (GPT-2's byte-to-unicode alphabet, no merges), plus four special
tokens, and a simple chat template so chat-formatted datasets work with it.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def _byte_vocab() -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    return vocab


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level `PreTrainedTokenizerFast` (260 tokens) with pad/bos/eos/unk and a chat template."""
    tokenizer = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
