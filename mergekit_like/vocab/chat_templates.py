"""The output's chat template: ``auto``, a built-in format's name, or a Jinja template of one's own.

``auto`` takes the template most of the models have (none: the output has none).
The built-in names are mergekit's; each renders its family's standard prompt format
(chatml exactly as mergekit's file does; the others without the stray newlines and
indentation that mergekit's files leave between turns).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

BUILT_IN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n"
    ),
    "llama3": (
        "{%- for message in messages %}\n"
        "{%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' %}\n"
        "{%- if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}\n"
        "{{- content }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set turns = messages %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in turns %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('roles must alternate user/assistant after an optional system message') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{%- if loop.first and system is defined %}"
        "{{- ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
        "{%- else %}{{- raise_exception('only user and assistant roles, after an optional system message') }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
    "alpaca": (
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{%- if systems %}{{- systems[-1]['content'] | trim }}{{ '\\n\\n' }}{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim }}"
        "{%- elif message['role'] == 'user_context' %}{{ '### Input:\\n' + message['content'] | trim }}"
        "{%- elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim }}"
        "{%- endif %}"
        "{%- if message['role'] != 'system' and not loop.last %}{{ '\\n\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\\n\\n### Response:\\n' }}"
        "{%- endif %}"
    ),
    "exaone": (
        "{%- for message in messages %}"
        "{%- if loop.first and message['role'] != 'system' %}{{- '[|system|][|endofturn|]\\n' }}{%- endif %}"
        "{{- '[|' + message['role'] + '|]' + message['content'] }}"
        "{%- if message['role'] == 'user' %}{{- '\\n' }}{%- else %}{{- '[|endofturn|]\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '[|assistant|]' }}{%- endif %}"
    ),
}


def chat_template_problem(value: object) -> str | None:
    """Why a recipe's ``chat_template`` value is not one (None: it is)."""
    if not isinstance(value, str) or not value.strip():
        return f"chat_template must be auto, one of {', '.join(BUILT_IN)}, or a Jinja template"
    if value == "auto" or value in BUILT_IN:
        return None
    if "{" not in value:
        return (f"chat_template {value[:40]!r} is neither a built-in name ({', '.join(BUILT_IN)}, auto) "
                "nor a Jinja template")
    return None


def resolve_chat_template(value: str, model_templates: Sequence[str | None]) -> str | None:
    """The template text for a recipe's ``chat_template`` (checked); ``auto`` may find none."""
    if value == "auto":
        found = [t.strip() for t in model_templates if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return BUILT_IN.get(value, value)
