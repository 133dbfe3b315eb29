"""The score stage: every supervised token of a noisy corpus under a causal LM, to per-token statistics.

``score`` reads the records ``inject`` wrote, tokenises them, runs the model body once per
batch and the output head chunk by chunk, reduces each chunk to the statistics of the score
table (``logp``, ``entropy``, ``rank``, ``expected_rank``, ``topk_entropy``, ``sum_p2``) and
writes them in resumable shards merged into one parquet file with its manifest.

Imports: :mod:`reweight_audit.core` (and :mod:`reweight_audit.methods`, below it), never
injection, evaluation, reporting or training (the layers contract in ``pyproject.toml``);
inject and score share only the record and span schema of :mod:`reweight_audit.core.spans`.

Modules, one job each:

* ``reader``   — the noisy JSONL or rows in memory, every record and span checked;
* ``encoding`` — templates, tokenisation, the token/noise alignment;
* ``batching`` — the batch plan, padding, the pad-id fallback, ``IGNORE_INDEX``;
* ``head``     — the verified, chunked output head and the statistics of a batch or a chunk;
* ``stats``, ``stats_kernel`` — the statistics of one chunk of logits (torch, and the numba kernel);
* ``shards``   — the shard folder, the run's fingerprint, ``--resume``, ranks, the merge;
* ``distributed`` — the process group; ``engine`` — :func:`~reweight_audit.scoring.engine.run_score`
  and its window loop; ``config`` — ``ScoreConfig``.

The public surface other stages and the faces (``bench``, ``training``) use, and nothing else:

* ``engine``: ``run_score``, ``ScoreResult``; ``config``: ``ScoreConfig``;
* ``reader``: ``NoisyRows``, ``NoisyRecord``, ``read_noisy``, ``scan_input``, ``input_digest``;
* ``encoding``: ``Encoded``, ``choose_template``, ``encode``, ``encode_records``;
* ``batching``: ``IGNORE_INDEX``, ``pad_id_of``, ``plan_batches``, ``pad_batch``, ``batch_inputs``;
* ``head``: ``find_head``, ``verify_head``, ``auto_chunk_rows``, ``logit_chunks``, ``score_batch``,
  ``chunk_statistics``, ``target_logp``, ``to_host``, ``STATS_COLUMNS``;
* ``shards``: ``batch_table`` (a batch's rows of the score table);
* ``stats``: ``token_statistics``, ``expected_rank_sorted``, ``backend``.
"""
