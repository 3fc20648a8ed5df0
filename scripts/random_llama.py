"""A random-initialised llama-3.2-1b as a Hugging Face folder (bf16 safetensors; --small: float32) with a
byte-level tokenizer.json, for the decode and throughput benchmarks of scripts/gpu_check.sh: flatstack and
transformers load the same folder, and no weights come from a hub. The prompts are random token ids;
the tokenizer only turns outputs into text.

    python scripts/random_llama.py OUT_DIR [--small]
"""

import argparse

import torch
import transformers

from flatstack.tokenizer import byte_tokenizer

# llama-3.2-1b's shape; the context cut to 4,096 (the benchmarks use under 1,000 positions) and plain RoPE
# (its llama3 frequency scaling changes no cost)
FULL = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
            rope_theta=500000.0, tie_word_embeddings=True)
SMALL = dict(FULL, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--small", action="store_true", help="a two-layer model of the same kind")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**(SMALL if args.small else FULL), bos_token_id=None, eos_token_id=None)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.float32 if args.small else torch.bfloat16)
    model.save_pretrained(args.out)
    byte_tokenizer().save(f"{args.out}/tokenizer.json")
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main()
