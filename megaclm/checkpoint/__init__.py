"""megaclm checkpoints: DeepSpeed's files plus megaclm's state, by explicit tag.

On-disk layout of `--save DIR` (every file written atomically; `latest` last):

    DIR/latest                       text: the newest complete tag, e.g. "iter_0000100" (megaclm's own,
                                     written by rank 0 after a barrier: it never names a partial save)
    DIR/best                         JSON {"tag", "val_loss"} of the lowest validation loss (--save-best)
    DIR/metrics.jsonl                training/eval metrics, one JSON object per line (default location)
    DIR/megaclm.lock                 JSON: the run writing here (host, pid, SLURM job, heartbeat), while it
                                     runs (megaclm.checkpoint.lock: one writer per directory)
    DIR/iter_0000100/                one tag = one iteration (Megatron's 7-digit naming)
        mp_rank_{TP:02d}_model_states.pt           DeepSpeed: module weights (16-bit under bf16/fp16),
                                                   client_state {"megaclm": {"progress", "data", ...}}
        layer_{L:02d}-model_{TP:02d}-model_states.pt   DeepSpeed, pipeline runs: one file per layer
        *zero_pp_rank_{DP}_mp_rank_{TP:02d}_optim_states.pt   DeepSpeed: fp32 master weights + Adam
                                                   moments, partitioned over data-parallel ranks
        layer_{L}_expert_{E}_mp_rank_{TP:02d}_model_states.pt   DeepSpeed, MoE: routed expert E of the
                                                   L-th MoE layer (its global id; the module file then
                                                   holds the rest), and with ZeRO-0 one optimizer file
                                                   per EP rank, expp_rank_{EP}_mp_rank_{TP:02d}_optim_states.pt
        megaclm/config.json          the resolved config tree (MegaclmConfig.to_dict())
        megaclm/manifest.json        every file of the tag (meta.json included) with its size and xxh3 checksum,
                                     written before meta.json; checked at load (megaclm.checkpoint.manifest)
        megaclm/meta.json            iteration, consumed samples/tokens, tp/pp/dp/world sizes,
                                     padded and tokenizer vocab sizes, zero stage, precision;
                                     written last: a tag without it is incomplete
        megaclm/rng/rank_{R:05d}.pt  python/numpy/torch/cuda RNG + DeepSpeed's RNG tracker, per rank
        megaclm/model/tp{TP:02d}_pp{PP:03d}.pt   fp32 parameters of one model-parallel rank (the
                                     optimizer's master copy), with tp/pp ranks and sizes
                                     (megaclm.checkpoint.shards); with expert parallelism, EP rank r > 0
                                     adds its routed experts in tp{TP:02d}_pp{PP:03d}_ep{r:03d}.pt
        megaclm/optim/...            the same files for the full Adam moments (megaclm.checkpoint.universal)
                                     model/ and optim/ are layout-independent: a save writes them only every
                                     --save-layout-independent-interval saves (gathered; MoE runs: always);
                                     otherwise they are made from DeepSpeed's files the first time something
                                     needs them (megaclm.checkpoint.from_deepspeed), and added to the manifest

Full fp32 weights of any TP/PP layout, with GPTModel's state-dict keys (megaclm.model.gpt):
    ckpt = megaclm.checkpoint.shards.load_full_state_dict("DIR")       # tag default: `latest`
    model = GPTModel(ModelConfig(**ckpt.config["model"]), ckpt.meta["padded_vocab_size"])
    model.load_state_dict(ckpt.state_dict)

Resume (`--load DIR`) passes the tag to DeepSpeed, restores the optimizer, progress, data/sampler
state and every rank's RNG: the resumed run's losses are bit-identical to an uninterrupted run's
(with the same OMP_NUM_THREADS). `--finetune` loads weights only; `--no-load-optim` skips the
optimizer states (fp32 master weights are then rebuilt from the module weights).

Without an engine: megaclm.checkpoint.from_deepspeed makes model/ and optim/ from DeepSpeed's files,
megaclm.checkpoint.hf converts to and from Hugging Face (pure from_hf/to_hf, HF
directories), megaclm.checkpoint.offline writes a checkpoint for any TP x PP from a full state dict
(tools/checkpoint/convert_hf.py import, reshard.py), and megaclm.checkpoint.weights is what
`--finetune` uses: the fp32 shards of any saved layout into a run of any layout and ZeRO stage.
"""
