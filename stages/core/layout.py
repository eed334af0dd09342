"""The fixed names of the artifact layout that more than one module needs: one home for each.

    <artifact_root>/runs/<run_id>/<stage>/              a stage's outputs (StageConfig.run_uri)
        manifest.json                                   the commit marker, written last, by every stage
        checkpoints/                                    working state beside the outputs, never one of them
    runs/<run_id>/tokenize/dataset/                     read by train_lora
    runs/<run_id>/tokenize/validation_docs.jsonl        read by evaluate
    runs/<run_id>/tokenize/chat_template.jinja          task=sft: the template used; train_lora copies it to
                                                        the adapter, where evaluate and batch_infer read it
    runs/<run_id>/train_lora/adapter/                   read by evaluate and batch_infer, copied by publish
        adapter_config.json, training_base.json
    runs/<run_id>/train_lora/train_log.jsonl            read by evaluate, copied by publish
    runs/<run_id>/evaluate/metrics.json, report.md, ... copied by publish
    runs/<run_id>/batch_infer/predictions.jsonl         or, sharded, .../batch_infer/shard-<i:05d>-of-<n:05d>/
                                                        predictions.jsonl; read by merge_predictions

A name that one module alone uses stays in that module. Names only: this module imports nothing of
ours and touches no store.
"""

from __future__ import annotations

# The folders under runs/<run_id>/ that another stage reads by default: each is its stage's name
# (``python -m stages.<name>``).
TOKENIZE = "tokenize"
TOKENIZE_SHARDS = "tokenize_shards"  # tokenize with num_shards > 1: shard-<i:05d>-of-<n:05d>/ each, then merged
TRAIN_LORA = "train_lora"
EVALUATE = "evaluate"
BATCH_INFER = "batch_infer"

# In every stage output.
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"

# tokenize
DATASET = "dataset"
VALIDATION_DOCS = "validation_docs.jsonl"
CHAT_TEMPLATE = "chat_template.jinja"  # transformers' own file name for a tokenizer's chat template

# train_lora (and a published model)
ADAPTER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's own name: the file that makes a folder an adapter
TRAINING_BASE = "training_base.json"  # the base model the adapter was trained on
TRAIN_LOG = "train_log.jsonl"

# evaluate
METRICS = "metrics.json"
REPORT = "report.md"
SAMPLES = "samples.jsonl"
LOSS_CURVE = "loss_curve.png"
PERPLEXITY_PLOT = "perplexity.png"
EVALUATION_FILES = (METRICS, REPORT, SAMPLES, LOSS_CURVE, PERPLEXITY_PLOT)

# batch_infer and merge_predictions
PREDICTIONS = "predictions.jsonl"
SHARD_PREFIX = "shard-"


def shard_name(index: int, count: int) -> str:
    """The folder that shard ``index`` of ``count`` commits under, inside batch_infer's output."""
    return f"{SHARD_PREFIX}{index:05d}-of-{count:05d}"
