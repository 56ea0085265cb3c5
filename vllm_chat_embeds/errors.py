"""Every message a client can get from this plugin, as constants tests match on.

Why one module: the wording is the contract. Each message names the content part (by its
position in the request) and the problem, so a client can fix the request without reading logs.
"""

from __future__ import annotations

from typing import Final, NoReturn

from vllm.exceptions import VLLMValidationError

# Where a part sits in the request, e.g. "messages[2].content[1]".
PART_WHERE: Final = "messages[{msg}].content[{part}]"

NOT_ENABLED: Final = (
    "{where}: prompt_embeds parts need the server started with "
    "--enable-prompt-embeds (offline: LLM(..., enable_prompt_embeds=True))."
)
UNKNOWN_KEYS: Final = (
    "{where}: unknown key(s) {keys} in a prompt_embeds part; allowed keys are {allowed}."
)
DATA_MISSING: Final = (
    "{where}: a prompt_embeds part needs a 'data' field holding base64 of torch.save(tensor)."
)
DATA_WRONG_TYPE: Final = (
    "{where}.data of a prompt_embeds part must be a base64 string (or, offline, a "
    "torch.Tensor); got {got}."
)
DATA_EMPTY: Final = "{where}.data of a prompt_embeds part is empty."
UNKNOWN_ENCODING: Final = (
    "{where}.encoding of a prompt_embeds part must be one of 'torch', 'raw', 'safetensors'; "
    "got {got}."
)
ENCODING_DISABLED: Final = (
    "{where}.encoding {got!r} of a prompt_embeds part is disabled on this server "
    "(CHAT_EMBEDS_ENCODINGS={allowed})."
)
RAW_ONLY_FIELDS: Final = (
    "{where}: 'dtype' and 'shape' of a prompt_embeds part apply to encoding 'raw' only."
)
RAW_MISSING_FIELD: Final = (
    "{where}.{field} is required in a prompt_embeds part with encoding 'raw'."
)
RAW_BAD_DTYPE: Final = (
    "{where}.dtype of a prompt_embeds part must be one of 'float32', 'float16', 'bfloat16'; "
    "got {got}."
)
RAW_BAD_SHAPE: Final = (
    "{where}.shape of a prompt_embeds part must be [num_rows, {width}] with non-negative "
    "integers; got {got}."
)
RAW_LENGTH: Final = (
    "{where}.data of a prompt_embeds part holds {got} base64 characters, but shape {shape} "
    "in {dtype} is {nbytes} "
    "bytes, which is {expected} base64 characters."
)
SAFETENSORS_BAD: Final = (
    "{where}.data of a prompt_embeds part is not a valid safetensors file ({reason})."
)
SAFETENSORS_COUNT: Final = (
    "{where}.data of a prompt_embeds part must hold exactly one tensor; it holds {count}."
)
NOT_BASE64: Final = "{where}.data of a prompt_embeds part is not valid base64 ({reason})."
TOO_MANY_BYTES: Final = (
    "{where}.data of a prompt_embeds part decodes to {size} bytes, over the limit of {limit} "
    "bytes per part "
    "(CHAT_EMBEDS_MAX_PART_BYTES)."
)
TOO_MANY_REQUEST_BYTES: Final = (
    "The request's prompt_embeds parts decode to {size} bytes, over the limit of {limit} bytes "
    "per request (CHAT_EMBEDS_MAX_REQUEST_BYTES)."
)
NOT_A_TENSOR_FILE: Final = (
    "{where}.data of a prompt_embeds part is not a tensor saved with torch.save (weights-only "
    "load failed: {reason})."
)
NOT_A_TENSOR: Final = "{where}.data of a prompt_embeds part holds a {got}, not a torch.Tensor."
BAD_LAYOUT: Final = (
    "{where}.data of a prompt_embeds part holds a {layout} tensor; only dense (torch.strided) "
    "tensors are accepted."
)
META_TENSOR: Final = (
    "{where}.data of a prompt_embeds part holds a meta tensor (a shape without data)."
)
BAD_NDIM: Final = (
    "{where}.data of a prompt_embeds part must be a 2-D tensor of shape (num_rows, {width}); "
    "got shape {shape}."
)
BAD_WIDTH: Final = (
    "{where}.data of a prompt_embeds part has width {got}; this model's input embeddings are "
    "{width} wide."
)
BAD_DTYPE: Final = (
    "{where}.data of a prompt_embeds part has dtype {dtype}; only floating-point tensors "
    "(float32, float16, "
    "bfloat16, float64) are accepted."
)
ZERO_ROWS: Final = (
    "{where}.data of a prompt_embeds part has 0 rows; a prompt_embeds part needs at least one row."
)
TOO_FEW_ROWS_TO_KEY: Final = (
    "{where}: a prompt_embeds part of {rows} rows is too short for this server's KV connector "
    "{connector}, which keys KV by token ids: a part needs at least {min_rows} rows there to be "
    "told apart from other rows. Send those rows as text, or as a longer part."
)
BAD_KV_TRANSFER_PARAMS: Final = (
    "kv_transfer_params.{field} {problem}; pass the kv_transfer_params the prefill server "
    "returned, unchanged."
)
NOT_FINITE: Final = "{where}.data of a prompt_embeds part contains NaN or infinite values."
TOO_MANY_PARTS: Final = (
    "The request has {count} prompt_embeds parts, over the limit of {limit} "
    "(CHAT_EMBEDS_MAX_PARTS)."
)
TOO_MANY_ROWS: Final = (
    "{where}: the request's prompt_embeds parts hold more than {limit} rows in total "
    "(CHAT_EMBEDS_MAX_ROWS, capped by the model's context length)."
)
RESERVED_TEXT: Final = (
    "{where} contains the reserved string {token!r}, which this server uses to mark the rows "
    "of a prompt_embeds part; remove it from the text."
)
PART_DROPPED: Final = (
    "The chat template did not render {where} (a prompt_embeds part); the template drops "
    "that content. Move the embeddings to a message the template renders, or start the "
    "server with CHAT_EMBEDS_DROPPED_PARTS=warn to ignore dropped parts."
)
BAD_REASONING_PART: Final = "{where}: a reasoning list may hold text and prompt_embeds parts only."
MARKER_MANGLED: Final = (
    "The chat template altered the position marker of a prompt_embeds part, so its place "
    "in the prompt cannot be determined safely."
)
MARKER_MERGED: Final = (
    "{where}: the tokenizer merged the position marker of this prompt_embeds part with the "
    "text around it, so its place in the prompt cannot be determined safely."
)
SPANS_CUT: Final = (
    "The tokenized prompt holds {found} prompt_embeds positions where its prompt_embeds parts "
    "need {expected}, one whole run per part (a part cut by truncate_prompt_tokens only at the "
    "truncated edge); the prompt cannot be built safely."
)
WITH_MULTIMODAL: Final = (
    "prompt_embeds parts in the same request as {modalities} parts are not supported by "
    "vllm-chat-embeds in tokenizer mode {mode!r} yet (docs/support-matrix.md lists what is)."
)
RESPONSES_ROLE: Final = (
    "{where}: /v1/responses takes prompt_embeds parts in user, system and developer messages "
    "only; this message's role is {role!r}."
)
RESPONSES_HARMONY: Final = (
    "{where}: prompt_embeds parts on /v1/responses are not supported for Harmony (gpt-oss) "
    "models yet."
)
MODE_UNSUPPORTED: Final = (
    "{where}: prompt_embeds parts are not supported with tokenizer mode {mode!r} yet "
    "(vllm-chat-embeds's support matrix lists the modes it serves)."
)
PLACEHOLDER_IN_TOKEN_IDS: Final = (
    "Token id {token_id} is the reserved prompt_embeds placeholder and cannot be sent as a "
    "token; send the embeddings as a prompt_embeds part instead."
)
IDS_LENGTH: Final = (
    "prompt_token_ids has {ids} ids but prompt_embeds has {rows} rows; they must match."
)
MASK_LENGTH: Final = (
    "prompt_is_token_ids has {mask} entries but prompt_embeds has {rows} rows; they must match."
)
TOKEN_CLASH: Final = (
    "The tokenizer already uses {token!r} for something else (it is not a single special "
    "token of its own), so vllm-chat-embeds cannot use it as the prompt_embeds placeholder."
)
UNSUPPORTED_VLLM: Final = (
    "vllm-chat-embeds {ours} supports vLLM {supported}, but vLLM {found} is installed. "
    "Install a supported vLLM, or set CHAT_EMBEDS_ALLOW_UNSUPPORTED_VLLM=1 to try "
    "anyway (unsupported)."
)


# -- parts by reference: a part's ``uuid`` (stores/references.py) --------------------------------
# Every "send the data again" answer carries REFERENCE_UNKNOWN_CODE, so clients can resend
# automatically; one of a server that keeps no references also carries REFERENCES_OFF_CODE.
REFERENCE_UNKNOWN_CODE: Final = "prompt_embeds_reference_unknown"
REFERENCES_OFF_CODE: Final = "prompt_embeds_references_off"
UUID_WRONG_TYPE: Final = "{where}.uuid must be a string naming the prompt_embeds part; got {got}."
UUID_EMPTY: Final = "{where}.uuid is empty; a prompt_embeds part's uuid must be a non-empty string."
UUID_TOO_LONG: Final = (
    "{where}.uuid is {length} characters long, over the limit of {limit} for a prompt_embeds "
    "part's uuid."
)
REFERENCE_UNKNOWN: Final = (
    "{where}: prompt_embeds_reference_unknown: this server holds no rows for the prompt_embeds "
    "part with uuid {uuid!r} (never sent here, evicted, or sent to another server process); "
    "send the part again with its data."
)
REFERENCES_OFF: Final = (
    "{where}: prompt_embeds_reference_unknown: this server keeps no prompt_embeds parts by uuid "
    "(prompt_embeds_references_off, CHAT_EMBEDS_REFERENCE_BYTES=0); send the part with its data."
)
# -- The shared row store (stores/shared_store.py, CHAT_EMBEDS_SHARED_STORE) -------------------
SHARED_STORE_NO_CLIENT: Final = (
    "{env} is set, but the Redis client is not installed; install it with "
    "pip install 'vllm-chat-embeds[redis]' (redis-py, with hiredis)."
)
SHARED_STORE_DOWN: Final = (
    "{where}: this server does not hold the rows of the prompt_embeds part with uuid {uuid!r}, "
    "and the shared row store {store} is unavailable ({reason}); retry in {retry_after} s, or "
    "send the part with its data."
)
SHARED_STORE_UPLOAD_DOWN: Final = (
    "{where}: the shared row store {store} is unavailable ({reason}), so the prompt_embeds part "
    "rows were not kept (an id only this server knew would fail on every other one); retry in "
    "{retry_after} s."
)
SHARED_STORE_FILES_DOWN: Final = (
    "The shared row store {store} is unavailable ({reason}); retry in {retry_after} s."
)
SHARED_VALUE_BAD: Final = (
    "{where}: prompt_embeds_reference_unknown: the rows of the prompt_embeds part kept under "
    "uuid {uuid!r} in the shared row store failed their check ({reason}) and were not used; "
    "send the part again with its data."
)
# -- Rows uploaded once, used by id (entrypoints/row_uploads.py): POST /v1/prompt_embeds and the
# Files API (POST /v1/files). Rows are checked with the part messages above, ``where`` naming
# the upload (UPLOAD_WHERE, FILE_WHERE).
UPLOAD_WHERE: Final = "upload"
FILE_WHERE: Final = "file"
TEXT_ROWS_WHERE: Final = "text"
TEXT_ROWS_TEXT: Final = (
    "{where}: POST /v1/prompt_embeds with a JSON body takes a 'text' field, a non-empty string "
    "whose prompt_embeds part rows the served model computes; got {got}."
)
TEXT_ROWS_SPECIAL: Final = (
    "{where}: add_special_tokens for the rows of a prompt_embeds part must be true or false; "
    "got {got}."
)
TEXT_ROWS_TOKENS: Final = (
    "{where}: the text tokenizes to ids outside this model's vocabulary of {vocab} (or to the "
    "reserved <prompt_embeds> token); only text the model embeds itself has prompt_embeds part "
    "rows."
)
UPLOAD_MEDIA_TYPE: Final = (
    "POST /v1/prompt_embeds takes the rows as the request body: Content-Type "
    "application/json (a 'text' field: the served model computes its rows), "
    "application/octet-stream (row-major little-endian values, with the dtype and shape query "
    "parameters) or application/safetensors (a safetensors file of one tensor); got {got!r}."
)
RAW_BODY_LENGTH: Final = (
    "{where}: the body holds {got} bytes of prompt_embeds part rows, but shape {shape} in "
    "{dtype} is {nbytes} bytes."
)
UPLOAD_REFERENCES_OFF: Final = (
    "{where}: this server keeps no rows by reference (prompt_embeds_references_off, "
    "CHAT_EMBEDS_REFERENCE_BYTES=0), so it takes no uploads; send the rows inline as a "
    "prompt_embeds part."
)
UPLOAD_OVER_STORE: Final = (
    "{where}: the rows take {size} bytes, more than this server keeps by reference "
    "({limit} bytes per API server process: CHAT_EMBEDS_REFERENCE_BYTES shared among "
    "--api-server-count); send them inline as a prompt_embeds part."
)
FILE_FORM: Final = (
    "POST /v1/files takes a multipart form with a 'file' field (the rows file) and a "
    "'purpose' field; {problem}."
)
FILE_NOT_ROWS: Final = (
    "file: this server's Files API holds prompt embeddings only: a safetensors file of one "
    "2-D tensor of shape (num_rows, {width}) (a '.safetensors' filename, or safetensors "
    "content); {filename!r} is neither."
)
FILE_NOT_FOUND: Final = (
    "No such File object: {file_id!r} (this server holds no rows under it: never uploaded here, "
    "deleted, evicted, or uploaded to another API server process)."
)
# -- Soft prompts: PEFT prompt tuning served by name (stores/soft_prompts.py) -----------------
# Loading (startup and /v1/load_soft_prompt): SOFT_PROMPT_ENTRY, then one of the messages below.
SOFT_PROMPT_ENTRY: Final = "Soft prompt {entry}: "
SOFT_PROMPT_SYNTAX: Final = (
    "expected name=path (CHAT_EMBEDS_SOFT_PROMPTS is a comma-separated list of name=path)."
)
SOFT_PROMPT_DUPLICATE: Final = "the name is listed twice in CHAT_EMBEDS_SOFT_PROMPTS."
SOFT_PROMPT_BAD_NAME: Final = (
    "the name {name!r} must start with a letter or digit and hold only letters, digits and "
    "the characters . _ : / @ + -."
)
SOFT_PROMPT_NAME_TAKEN: Final = "the name {name!r} is the served model's own name."
SOFT_PROMPT_MISSING: Final = "no such file or folder."
SOFT_PROMPT_NOT_PEFT: Final = (
    "expected a PEFT prompt-tuning folder (adapter_config.json and "
    "adapter_model.safetensors) or a .safetensors file holding one 2-D tensor."
)
SOFT_PROMPT_UNREADABLE: Final = "cannot be read ({reason})."
SOFT_PROMPT_PEFT_TYPE: Final = (
    "is a PEFT {peft_type} checkpoint; only PROMPT_TUNING soft prompts are served (prefix "
    "tuning acts on the KV cache, not on the input embeddings)."
)
SOFT_PROMPT_SUBMODULES: Final = (
    "num_transformer_submodules is {got}; only 1 (decoder-only models) is served."
)
SOFT_PROMPT_NO_WEIGHTS: Final = "the folder holds none of {files}."
SOFT_PROMPT_NO_TENSOR: Final = "{file} holds no 'prompt_embeddings' tensor (it holds {keys})."
SOFT_PROMPT_TENSOR_COUNT: Final = (
    "a .safetensors soft prompt must hold exactly one tensor; it holds {count}."
)
SOFT_PROMPT_ROW_COUNT: Final = (
    "prompt_embeddings has {rows} rows but adapter_config.json says num_virtual_tokens is "
    "{virtual}."
)
SOFT_PROMPT_NDIM: Final = (
    "a soft prompt must be a 2-D tensor of shape (num_virtual_tokens, {width}); got {got}."
)
SOFT_PROMPT_DTYPE: Final = "the tensor has dtype {dtype}; a soft prompt must be floating point."
SOFT_PROMPT_WIDTH: Final = "width {got} does not match this model's hidden size {width}."
SOFT_PROMPT_ROWS: Final = (
    "{rows} virtual tokens; a soft prompt needs at least 1 and fewer than the context length "
    "{limit}."
)
SOFT_PROMPT_NOT_FINITE: Final = "the tensor holds NaN or infinite values (in the model's dtype)."
SOFT_PROMPTS_NEED_EMBEDS: Final = (
    "CHAT_EMBEDS_SOFT_PROMPTS needs the server started with --enable-prompt-embeds "
    "(offline: LLM(..., enable_prompt_embeds=True))."
)
# Requests.
SOFT_PROMPT_GONE: Final = (
    "The soft prompt {name!r} named as the model was unloaded while the request was rendered."
)
SOFT_PROMPT_UNKNOWN_MODEL: Final = (
    "{name!r} is not a soft prompt served here; served soft prompts: {served}."
)
NAMED_PART_KEYS: Final = (
    "{where}: a prompt_embeds part with a 'name' takes no other key than 'type'; remove {keys} "
    "(send either a soft prompt's name or the data)."
)
NAMED_PART_BAD_NAME: Final = (
    "{where}.name must be a non-empty string naming a soft prompt for this prompt_embeds part; "
    "got {got}."
)
NAMED_PART_UNKNOWN: Final = (
    "{where}: the prompt_embeds part names soft prompt {name!r}, which this server does not "
    "serve (served: {served})."
)
# /v1/load_soft_prompt and /v1/unload_soft_prompt.
RUNTIME_DISABLED: Final = (
    "Runtime soft prompt updates are disabled; start the server with "
    "CHAT_EMBEDS_ALLOW_RUNTIME_SOFT_PROMPTS=1 to enable /v1/load_soft_prompt and "
    "/v1/unload_soft_prompt."
)
RUNTIME_MULTI_SERVER: Final = (
    "Runtime soft prompt updates are refused with --api-server-count {count}: each API server "
    "process keeps its own soft prompts, so an update would reach only one of them. List the "
    "soft prompts in CHAT_EMBEDS_SOFT_PROMPTS instead."
)
RUNTIME_NO_ROOT: Final = (
    "Runtime soft prompt loading needs CHAT_EMBEDS_SOFT_PROMPTS_ROOT, the folder that loaded "
    "paths must lie inside."
)
RUNTIME_OUTSIDE_ROOT: Final = (
    "path {path!r} lies outside CHAT_EMBEDS_SOFT_PROMPTS_ROOT; only soft prompts inside it can "
    "be loaded at runtime."
)
RUNTIME_BAD_FIELD: Final = "{field} must be a non-empty string."
RUNTIME_NOT_LOADED: Final = "No soft prompt named {name!r} is loaded."

# vLLM's scale-out split (render servers -> token engines, /inference/v1/generate).
SCALE_OUT_NO_PAYLOAD: Final = (
    "mm_payload {got!r} would leave out this prompt's {rows} prompt_embeds row(s), and nothing "
    "else can bring them to the token engine; render it with mm_payload 'tensors'."
)
SCALE_OUT_NOT_ENABLED: Final = (
    "features.mm_hashes.prompt_embeds: this request carries prompt_embeds rows; they need the "
    "server started with --enable-prompt-embeds (and a tokenizer mode that serves them)."
)
SCALE_OUT_ITEMS_UNEVEN: Final = (
    "features: the prompt_embeds items disagree: {hashes} hash(es), {ranges} placeholder "
    "range(s) and {items} serialised item(s) in kwargs_data; each item needs all three."
)
SCALE_OUT_ROWS_MISSING: Final = (
    "{where} is missing: this server keeps no rows to resolve it from, so the item of every "
    "prompt_embeds part must carry its rows (render with mm_payload 'tensors')."
)
SCALE_OUT_ROWS_MALFORMED: Final = (
    "{where} is not the serialised item of a prompt_embeds part (one tensor under "
    "'embedding', as /render writes it): {reason}."
)
SCALE_OUT_HASH_MISMATCH: Final = (
    "{where} does not match the rows of its prompt_embeds part; send the hash /render wrote "
    "for them."
)
SCALE_OUT_RANGE_BAD: Final = (
    "{where} is offset {offset}, length {length}, but its prompt_embeds part holds {rows} "
    "row(s) and the request {ids} token id(s); a range must lie inside token_ids and span "
    "its part's rows."
)
SCALE_OUT_OVERLAP: Final = (
    "features.mm_placeholders.prompt_embeds: two items' ranges overlap at position {offset}."
)
SCALE_OUT_DTYPE: Final = (
    "{where} holds {got} rows of a prompt_embeds part beside images; this model takes {dtype} "
    "rows there."
)
SCALE_OUT_TOKEN_ID: Final = (
    "token_ids: token id {token_id} is outside this model's vocabulary ({vocab} ids)."
)


def reject(template: str, parameter: str | None = None, **fields: object) -> NoReturn:
    """Raise the 400 error vLLM's entrypoints turn into a JSON error response.

    The parameter is the request field the part sits in: ``input`` for a part located in a
    /v1/responses input, ``messages`` otherwise, unless the caller names another.
    """
    if parameter is None:
        where = fields.get("where")
        from_input = isinstance(where, str) and where.startswith("input[")
        parameter = "input" if from_input else "messages"
    raise VLLMValidationError(template.format(**fields), parameter=parameter)
