"""bench.py's runs: the reference command's flags, each run's own flags and environment, and the DeepSpeed file's
variants they name (benchmarks/RESULTS.md says what each measured)."""

REFERENCE_FLAGS = ["--stage", "sft", "--do_train", "True", "--finetuning_type", "lora", "--template", "qwen",
                   "--dataset", "huanhuan", "--cutoff_len", "1024", "--learning_rate", "5e-04",
                   "--num_train_epochs", "10", "--max_samples", "100000", "--per_device_train_batch_size", "4",
                   "--gradient_accumulation_steps", "4", "--lr_scheduler_type", "cosine", "--max_grad_norm", "1.0",
                   "--warmup_steps", "0", "--neftune_noise_alpha", "0", "--lora_rank", "8", "--lora_dropout", "0.1",
                   "--lora_alpha", "32", "--lora_target", "q_proj,v_proj,k_proj,gate_proj,up_proj,o_proj,down_proj",
                   "--bf16", "True", "--logging_steps", "5", "--overwrite_output_dir", "--seed", "42"]  # fmt: skip
# A run is NAME or NAME@GPUS (2 GPUs when not given): NAME's extra flags on the reference command, launched on that
# many GPUs of the host. "{file}" names a DeepSpeed variant written by `write_variants`.
PLAIN = ["--enable_liger_kernel", "false", "--torch_compile", "false"]  # eager layers, no fused kernels
RUNS = {
    "zero3": [],  # the reference DeepSpeed file as it is: lorakit's defaults (whole layers per gather, compiled layers)
    "zero3-eager": ["--torch_compile", "false"],  # the defaults before session 6: eager layers, Liger if there
    "zero2-eager": ["--zero_stage", "2", "--torch_compile", "false"],
    "zero3-plain": PLAIN,
    "zero2-plain": ["--zero_stage", "2", *PLAIN],
    # ZeRO-3 settings against zero3-plain (no fused kernels in any of them)
    "zero3-permodule": ["--deepspeed", "{per_module}", *PLAIN],  # DeepSpeed's own units
    "zero3-persist": ["--deepspeed", "{persist}", *PLAIN],  # frozen weights resident
    "zero3-bigfetch": ["--deepspeed", "{bigfetch}", *PLAIN],
    "zero3-hfpersist": ["--deepspeed", "{hfpersist}", *PLAIN],
    "zero3-hfprefetch": ["--deepspeed", "{hfprefetch}"],  # lorakit's defaults but HF's prefetch bucket
    "zero3-persist-liger": ["--deepspeed", "{persist}"],  # lorakit's defaults, every frozen weight resident
    "zero3-keephalf": ["--deepspeed", "{keephalf}"],  # --arch 32b: half the weights resident, half partitioned
    "zero3-layerfetch": ["--deepspeed", "{layerfetch}"],  # --arch 32b: the next layer gathered while one computes
    "zero3-sequential": ["--deepspeed", "{sequential}"],  # each weight its own all-gather (slower: session 13)
    "zero3-partitioned": ["--deepspeed", "{partitioned}"],  # every frozen weight partitioned, as on smaller GPUs
    # the same, eager layers: where the frozen-linear fix (lorakit.engine.frozen_linear) shows in peak memory
    "zero3-partitioned-eager": ["--deepspeed", "{partitioned}", "--torch_compile", "false"],
    "zero3-allreducefetch": ["--deepspeed", "{allreducefetch}"],  # gathers as all-reduces into place (no copy-out)
    "zero3-allgatherfetch": ["--deepspeed", "{allgatherfetch}"],  # DeepSpeed's all-gather and copy-out (before s14)
    "zero3-noncontiguous": ["--deepspeed", "{noncontiguous}"],  # no per-gradient copy into the reduce bucket
    # stage 2 without its per-gradient bucket copies: it then flattens the bucket's gradients and all-reduces them
    # (DeepSpeed's buffered_reduce_fallback) instead of reducing its buffer: a different reduction, not yet compared
    "zero2-noncontiguous": ["--zero_stage", "2", "--deepspeed", "{noncontiguous}"],
    "zero2": ["--zero_stage", "2"],
    "zero3-compiled": ["--torch_compile"],  # decoder layers under torch.compile (Liger off: inductor fuses instead)
    "zero2-compiled": ["--zero_stage", "2", "--torch_compile"],  # since session 17 with CUDA graphs, as zero2
    # the compiled layers replayed as CUDA graphs (one per row length): the default since session 17 under ZeRO-2
    # and since session 19 under ZeRO-3 where every weight stays whole, where a rank's pass holds at most 2,048 tokens
    # on average and memory allows (so at the reference per-GPU batch zero3-graphs runs as zero3 does, at 128
    # examples a step zero3-nographs); where some weights are partitioned a request falls back to the mode without
    # graphs
    "zero3-graphs": ["--torch_compile_mode", "reduce-overhead"],
    "zero3-nographs": ["--torch_compile_mode", "default"],
    "zero2-graphs": ["--zero_stage", "2", "--torch_compile_mode", "reduce-overhead"],
    "zero2-nographs": ["--zero_stage", "2", "--torch_compile_mode", "default"],
    # the gradient reduction on the backward's own stream: no host synchronisation at the end of each micro-batch's
    # backward under ZeRO-2 (stage 3 still synchronises), and stage 3's bucket copies ordered with CUDA graphs
    "zero3-nooverlap": ["--deepspeed", "{nooverlap}"],
    "zero2-nooverlap": ["--zero_stage", "2", "--deepspeed", "{nooverlap}"],
    "zero2-graphs-nooverlap": ["--zero_stage", "2", "--deepspeed", "{nooverlap}", "--torch_compile_mode",
                               "reduce-overhead"],
    # the same with DeepSpeed's bf16 overflow check kept (lorakit turns it off under ZeRO-1/2 where the file is silent)
    "zero2-graphs-nooverlap-overflowcheck": ["--zero_stage", "2", "--deepspeed", "{nooverlap_overflowcheck}",
                                             "--torch_compile_mode", "reduce-overhead"],
    "full-zero3-graphs": ["--max_steps", "-1", "--torch_compile_mode", "reduce-overhead"],
    # an experiment (benchmarks/device_wait.py runs them): DeepSpeed's per-step host synchronisations as device waits
    "zero3-devicewait": [],
    "zero2-devicewait": ["--zero_stage", "2"],
    "full-zero3-devicewait": ["--max_steps", "-1"],
    "zero3-liger": ["--enable_liger_kernel"],  # fused RMSNorm / RoPE / SwiGLU (lorakit[kernels])
    "zero2-liger": ["--zero_stage", "2", "--enable_liger_kernel"],
    # rows of 8,192 tokens: one forward pass per rank where a step's share exceeds 4,096 tokens
    "zero3-liger-8k": ["--enable_liger_kernel", "--pack_tokens", "8192"],
    "zero2-liger-8k": ["--zero_stage", "2", "--enable_liger_kernel", "--pack_tokens", "8192"],
    "unpacked-zero2": ["--zero_stage", "2", "--packing", "false"],
    # the whole 10-epoch job, not a projection
    "full-zero3": ["--max_steps", "-1"],
    "full-zero3-warm": ["--max_steps", "-1"],  # full-zero3's inductor cache: warm only after full-zero3@N ran
    "full-zero2": ["--zero_stage", "2", "--max_steps", "-1"],
    "full-zero3-liger": ["--max_steps", "-1", "--enable_liger_kernel"],
    "full-zero2-liger": ["--zero_stage", "2", "--max_steps", "-1", "--enable_liger_kernel"],
    # packed vs unpacked, same examples and steps: 512 examples, 2 epochs (32 steps), to compare final-epoch loss
    "short-packed": ["--zero_stage", "2", "--max_samples", "512", "--num_train_epochs", "2", "--max_steps", "-1"],
    "short-unpacked": ["--zero_stage", "2", "--max_samples", "512", "--num_train_epochs", "2", "--max_steps", "-1",
                       "--packing", "false"],
    # QLoRA (4-bit NF4, double quantisation): ZeRO-2 (one GPU), ZeRO-3 as lorakit plans it (quantised weights kept
    # whole where they fit), ZeRO-3 with the frozen weights partitioned (the adapter resident); --arch 32b for the
    # 32B architecture
    "qlora": ["--quantization_bit", "4", "--zero_stage", "2"],
    "qlora-zero3": ["--quantization_bit", "4"],
    "qlora-zero3-partitioned": ["--quantization_bit", "4", "--deepspeed", "{partitioned}"],
    # the LoRA variants (issue 14) under lorakit's ZeRO-3 defaults, against `zero3` in the same lease
    "dora-zero3": ["--use_dora"],
    "rslora-zero3": ["--use_rslora"],
    "pissa-zero3": ["--pissa_init"],
    "loraplus-zero3": ["--loraplus_lr_ratio", "16"],
    "fullmodules-zero3": ["--additional_target", "embed_tokens,lm_head"],  # 1.1 B weights trained in full
}  # fmt: skip
SCRIPTS = {name: "benchmarks/device_wait.py" for name in RUNS if name.endswith("-devicewait")}  # else sft.py
# PyTorch's allocator growing segments in place instead of caching fixed blocks: the 72B on 4 H200s flushed its
# cache twice in 16 steps at 91 of 139 GiB allocated (rows change length every step; RESULTS.md session 16)
EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
RUNS |= {"zero3-expandable": [], "zero2-expandable": ["--zero_stage", "2"],
         "full-zero3-expandable": ["--max_steps", "-1"]}  # fmt: skip
ENVIRONMENTS = {name: EXPANDABLE for name in RUNS if name.endswith("-expandable")}  # a run's own environment
VARIANTS = {  # the reference DeepSpeed file with these ZeRO settings changed (see RESULTS.md)
    "per_module": {"stage3_module_granularity_threshold": 0},
    "persist": {"stage3_param_persistence_threshold": 10**12},
    "hfpersist": {"stage3_param_persistence_threshold": 35840},  # HF's 10 x hidden: MLP LoRA matrices gathered
    "hfprefetch": {"stage3_prefetch_bucket_size": int(0.9 * 3584**2)},  # HF's auto: a twentieth of a layer
    # above the largest LoRA matrix of the 7B and 32B at r=8 (221,184), below their smallest frozen weight (k_proj,
    # 459k packed 4-bit elements in the 7B): every frozen weight partitioned, the adapter resident
    "partitioned": {"stage3_param_persistence_threshold": 300_000},
    # a prefetch bucket above one partitioned 32B decoder layer (487 M weights; HF's auto is 23.6 M), but within the
    # file's live budget of 1e9 (two 32B layers), so DeepSpeed still gathers about half of each layer on demand:
    # lorakit's own rule since session 11 also raises the budget (deepspeed_config.gather_next_layer_ahead)
    "layerfetch": {"stage3_prefetch_bucket_size": 6 * 10**8},
    "nooverlap": {"overlap_comm": False},  # DeepSpeed's reduction stream off (RESULTS.md session 7 says why)
    "nooverlap_overflowcheck": {"overlap_comm": False},  # and SECTIONS' bf16 below
    # each frozen weight gathered straight into its own buffer, not a layer into one rank-ordered buffer and each
    # weight copied out of it (DeepSpeed's coalesced default: 1,021 torch.cat a 32B step); 6 % slower (session 13)
    "sequential": {"stage3_allgather_sequential": True},
    # each rank writes its partitions into a zeroed layer buffer at every weight's own offset and an all-reduce sums
    # them: the weights are views of that buffer (no copy-out), for twice an all-gather's traffic
    "allreducefetch": {"stage3_use_all_reduce_for_fetch_params": True},
    "allgatherfetch": {"stage3_use_all_reduce_for_fetch_params": False},
    # stage 3 copies each gradient into its reduce bucket as it is produced (a stream switch, a copy and a
    # record_stream per LoRA matrix: 392 a 7B step), then reduce-scatters the per-parameter gradients anyway
    "noncontiguous": {"contiguous_gradients": False},
    # the first ~half of the 32B's weights kept whole (DeepSpeed marks parameters persistent in model order until
    # the model threshold's total): fewer gathers a step where the rest is partitioned (issue 11's 32B lever)
    "keephalf": {"stage3_param_persistence_threshold": 10**12, "stage3_model_persistence_threshold": 16 * 10**9},
    # larger prefetch and live-parameter budgets, so NCCL moves large messages
    "bigfetch": {
        "stage3_prefetch_bucket_size": 5 * 10**8,
        "stage3_max_live_parameters": 3 * 10**9,
        "stage3_max_reuse_distance": 3 * 10**9,
        "reduce_bucket_size": 5 * 10**8,
    },
}

# a variant's sections outside zero_optimization: DeepSpeed's bf16 overflow check kept, as if the file said so
SECTIONS = {
    "nooverlap_overflowcheck": {"bf16": {"enabled": "auto", "check_grad_overflow": True}},
}
