"""Generate completions for a few chat prompts.

    python example.py [MODEL_DIR_OR_HUB_ID]

MODEL defaults to ~/huggingface/Qwen3-0.6B; when that directory is missing it is downloaded from the
Hugging Face hub (needs network access and `huggingface_hub`).
"""
import os
import sys

from nanovllm import LLM, SamplingParams

DEFAULT_HUB_ID = "Qwen/Qwen3-0.6B"
DEFAULT_DIR = os.path.expanduser("~/huggingface/Qwen3-0.6B")


def download_command(hub_id: str, path: str) -> str:
    return f"hf download {hub_id} --local-dir {path}"


def ensure_model(arg: str | None) -> str:
    """A local model directory: the argument if it exists, else a download of the hub id."""
    if arg and os.path.isdir(os.path.expanduser(arg)):
        return os.path.expanduser(arg)
    looks_like_hub_id = arg and arg.count("/") == 1 and not arg.startswith((".", "/", "~"))
    if arg and not looks_like_hub_id:
        sys.exit(f"model directory {arg!r} does not exist")
    hub_id = arg or DEFAULT_HUB_ID
    path = DEFAULT_DIR if arg is None else os.path.expanduser(f"~/huggingface/{hub_id.split('/')[-1]}")
    if os.path.isdir(path):
        return path
    print(f"{path} is missing; downloading {hub_id} from the Hugging Face hub ...", file=sys.stderr)
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(hub_id, local_dir=path)
    except Exception as e:  # no network, no hub access, or no huggingface_hub
        sys.exit(f"could not download {hub_id} ({type(e).__name__}: {e}).\n"
                 f"Download it yourself, then rerun:\n    {download_command(hub_id, path)}\n"
                 f"    python example.py {path}")
    return path


def main():
    path = ensure_model(sys.argv[1] if len(sys.argv) > 1 else None)
    llm = LLM(path, enforce_eager=False, tensor_parallel_size=1)
    sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
    prompts = ["introduce yourself", "list all prime numbers within 100"]
    if llm.tokenizer.chat_template:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
    for prompt, output in zip(prompts, llm.generate(prompts, sampling_params)):
        print(f"\nPrompt: {prompt!r}\nCompletion: {output['text']!r}")


if __name__ == "__main__":
    main()
