"""megaclm.training: the only layer that calls deepspeed.initialize.

    pretrain.main(argv)   the whole run (pretrain_gpt.py): config -> checks -> engine -> data -> loop
    engine                process groups, model (plain or PipelineModule), AdamW groups, DeepSpeed engine
    batch                 datasets -> sampler -> micro-batches (curriculum cut, pipeline tuple format)
    loop                  Trainer.train, the short loop over the parts below; StepLogger (metrics windows)
    step                  TrainStep (one global batch through the engine, per-token loss), Evaluator
    checkpointer          save cadence, best, final save; the one restore path (--load, spike rollback)
    callbacks             the loop's hooks; spike and NaN guards, hang watchdog, stop conditions, --callbacks
    progress              Progress (iteration, consumed samples/tokens, ...), TrainingDiverged
    schedules             learning-rate closed forms (constant, linear, cosine, inverse-sqrt, WSD)
    metrics               console line, metrics.jsonl, TensorBoard, W&B, tqdm
"""
