"""What the model will be trained on, example by example: ids, labels and the decoded text.

`python -m lorakit preview FLAGS` prints the first N encoded examples as JSON lines; the training log shows
the first example of the run the same way.
"""

from __future__ import annotations

from typing import Any

from lorakit.checks import check_special_tokens, check_tokenizer_files, check_tokenizer_not_empty
from lorakit.config import Config
from lorakit.data.encode import encode_conversation, example_record
from lorakit.data.mixing import load_mixed
from lorakit.data.records import resolve_datasets
from lorakit.data.system_prompt import system_template, with_system
from lorakit.engine.model import load_tokenizer, model_config
from lorakit.errors import LorakitError
from lorakit.templates import get_template
from lorakit.templates.tools import has_tools, refuse_tools


def preview(config: Config, num_examples: int) -> list[dict[str, Any]]:
    """The first `num_examples` examples as the training run would encode them (no cache, no model weights)."""
    model_path, trust = config.model.model_name_or_path, config.model.trust_remote_code
    hf_config = model_config(model_path, trust)
    check_tokenizer_files(model_path)
    tokenizer = load_tokenizer(model_path, hf_config, trust_remote_code=trust)
    check_tokenizer_not_empty(tokenizer, model_path)
    data = config.data
    template = system_template(get_template(config.model.template, tokenizer), data.system, data.default_system)
    check_special_tokens(template, tokenizer, config.model.template)
    specs = resolve_datasets(data.dataset_dir, data.dataset)
    mixed = load_mixed(specs, data, config.train.seed)  # in training's order
    records = []
    for index, (messages, where) in enumerate(zip(mixed.conversations[:num_examples], mixed.wheres)):
        messages = with_system(messages, data.system, data.default_system)
        if has_tools(messages) and not getattr(template, "renders_tools", False):  # as training refuses it
            refuse_tools(template, index, "the training data's")
        try:
            example = encode_conversation(messages, template, tokenizer, data.cutoff_len, data.train_on_prompt,
                                          data.mask_history)  # fmt: skip
        except LorakitError as err:  # the template's own checks on a record, named as training names it
            raise LorakitError(f"{where}: {err}") from None
        record = example_record(example.input_ids, example.labels, tokenizer, index)
        records.append({**record, "truncated": example.truncated})
    return records
