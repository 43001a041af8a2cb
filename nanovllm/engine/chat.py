"""Chat conversations to prompt token ids, through the tokenizer's chat template."""


def is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def check_conversation(conversation, where: str) -> None:
    if not is_conversation(conversation):
        raise TypeError(f"{where} must be a conversation: a non-empty list of {{'role': str, 'content': str}} "
                        f"dicts, got {type(conversation).__name__}")
    for j, message in enumerate(conversation):
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise TypeError(f"{where}[{j}][{key!r}] must be a str, got {type(message.get(key)).__name__}")


def conversations_to_prompts(tokenizer, messages, chat_template_kwargs: dict | None) -> list[list[int]]:
    """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations.
    Returns one prompt (token ids) per conversation, ending with the assistant's generation prompt."""
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise TypeError(f"chat_template_kwargs must be a dict or None, got {type(chat_template_kwargs).__name__}")
    if is_conversation(messages):
        conversations, where = [messages], "messages"
    elif isinstance(messages, list):
        conversations, where = messages, "messages[{}]"
    else:
        raise TypeError(f"messages must be a conversation (a list of {{'role', 'content'}} dicts) or a list of "
                        f"conversations, got {type(messages).__name__}")
    for i, conversation in enumerate(conversations):
        check_conversation(conversation, where.format(i))
    if conversations and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template; format the prompts yourself and "
                         "call generate")
    prompts = []
    for conversation in conversations:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {}))
        # The template writes the special tokens itself; encode must not add more (e.g. a second BOS).
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts
