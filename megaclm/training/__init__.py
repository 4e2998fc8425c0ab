"""megaclm.training: the only layer that calls deepspeed.initialize.

    pretrain.main(argv)   the whole run (pretrain_gpt.py): config -> checks -> engine -> data -> loop
    engine                process groups, model (plain or PipelineModule), AdamW groups, DeepSpeed engine
    batch                 datasets -> sampler -> micro-batches (curriculum cut, pipeline tuple format)
    loop                  Trainer: steps, NaN skipping, evaluation, checkpoints, signals, exits
    schedules             learning-rate closed forms (constant, linear, cosine, inverse-sqrt, WSD)
    metrics               console line, metrics.jsonl, TensorBoard, W&B, tqdm
"""
