"""Base training config: every key with its default. Other configs start from this one and override.

    percausal train --config configs/tiny.py --workdir runs/x --config.optimizer.lr=1e-4
"""

import ml_collections

from percausal_jax.objectives import default_config as objective_defaults


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.path = "embedded"  # HF dir, hub id, or "embedded" (SmolLM2-135M-Instruct)
    c.model.dtype = "float32"  # parameter dtype (frozen LoRA base may be bfloat16)
    c.model.compute_dtype = "float32"  # activation dtype; log-softmax is always float32
    # One compiled layer body: compile time constant in depth. CPU: False steps 4–5% faster at 256–512 tokens (the
    # scan slices/stacks per layer; bench/RESULTS.md "CPU profile") for a compile that grows with depth.
    c.model.scan_layers = True
    c.model.remat_policy = "none"  # none | full | dots | save_qkv_proj | minimal
    # auto | xla | blocked | cudnn | splash. auto (models.layers.resolve_attention_impl): splash on TPU, cudnn on GPU
    # for bf16/fp16 compute, blocked (flash-style tiles, no [L, L] mask) elsewhere and where those cannot run (Gemma2
    # soft-capping, fp32 on GPU; on TPU mixed sliding/global layers under scan_layers, lengths not a multiple of
    # 128). CPU (bench/cpu_profile.py attention, 1 core, bench/RESULTS.md "CPU profile"): blocked fwd+bwd is 2.1× /
    # 2.3× / 4.1× faster than xla at 320 / 576 / 1088 tokens.
    c.model.attention_impl = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # JSONL / parquet / ArrayRecord of canonical or prompt records
    c.data.eval = ""
    c.data.shuffle = True
    c.data.template = "chat"  # chat | none
    c.data.counterfactual_mode = "drop"  # drop | placeholder
    c.data.retriever = "bm25"  # bm25 | recency | random | contriever
    c.data.retriever_path = ""  # contriever encoder: hub id, local or gs:// dir (data.retriever="contriever")
    c.data.retriever_revision = ""  # hub revision (commit / branch) of retriever_path; "" = main
    c.data.strict = False  # True: a record with an empty required field is an error, not a skip
    c.data.task = ""  # every record must be of this task (e.g. product_review); "" = any
    c.data.k = 4
    c.data.max_prompt_len = 1024
    c.data.max_response_len = 512
    c.data.truncate_response = True  # over max_response_len: keep the first tokens, without EOS (False = drop)
    c.data.budget_mode = "drop"  # drop | truncate (profile items)
    c.data.packing = False
    # packing: every batch is (B, pack_*_len) rows, one compiled shape; 0 = the longest admissible example rounded up
    # to bucket_multiple (both sequences: max_prompt_len + max_response_len - 1; responses: max_response_len). Longer
    # rows hold more examples and pad less (LongLaMP lengths: 8192 / 2560 / 1792 pad ~9%, bench/packing.py)
    c.data.pack_personal_len = 0
    c.data.pack_counterfactual_len = 0
    c.data.pack_response_len = 0
    c.data.pack_lookahead = 64  # examples kept pending for first-fit-decreasing placement (0 = first fit in order)
    c.data.bucket_multiple = 64
    c.data.separator = "\n"  # ends both prompts of canonical records with template none ("" = glued)
    c.data.enable_thinking = False  # passed to chat templates (Qwen3: False = the empty think block)

    c.objective = objective_defaults()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.global_batch_size = 8
    c.train.grad_accum_steps = 1
    c.train.log_every = 1
    c.train.eval_every = 0  # 0 = only at the end (when data.eval is set)
    c.train.eval_batches = 4
    c.train.nan_policy = "skip"  # skip | fail
    c.train.peak_tflops = 0.0  # per device, for the MFU estimate (0 = not reported)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # adamw | sgd | adafactor
    c.optimizer.lr = 2e-5
    c.optimizer.schedule = "cosine"  # constant | linear | cosine
    c.optimizer.warmup_steps = 0
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0  # 0 = off
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.momentum = 0.0

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tuning
    c.lora.alpha = 16.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 3

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1 fills the remaining devices
    c.mesh.tensor = 1
    # ranks of each axis across processes (hosts); the rest within one (MaxText's dcn_*_parallelism). All 1: JAX's
    # own device order. E.g. tensor=2, dcn_tensor=2: every tensor pair spans two hosts.
    c.mesh.dcn_data = 1
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_tensor = 1
    return c
