"""A character-level tokenizer saved as a Hugging Face fast tokenizer."""

from __future__ import annotations

from pathlib import Path

from evomerge.zoo.tasks import ALPHABET

PAD, UNK, BOS = "<pad>", "<unk>", "<s>"
SPECIALS = (PAD, UNK, BOS)


def build_char_tokenizer(alphabet: str = ALPHABET):
    """Return a ``PreTrainedTokenizerFast`` with one token per character of ``alphabet``.

    Every character is pre-tokenized on its own and decoding fuses tokens without
    spaces, so ``decode(encode(s)) == s`` for any string over the alphabet.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token="\n",
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Write the tokenizer files into an HF model directory."""
    tokenizer.save_pretrained(str(out_dir))
