/* ct_queue.h - one priority level's queue: intrusive, unbounded-by-structure, many producers.
 *
 * Producers push with a single atomic exchange (wait-free: no CAS loop, no lock), which is
 * D. Vyukov's intrusive MPSC design. Consumers pop under the engine's pop lock, so any number
 * of workers can consume (MPMC overall) and a worker takes a whole batch per lock. The bound
 * (queue_size) is enforced by the engine's counter, not by the structure, so a queued task
 * costs no memory beyond its node: no preallocated ring. */
#ifndef CT_QUEUE_H
#define CT_QUEUE_H

#include "ct_common.h"

typedef struct ct_qnode {
    _Atomic(struct ct_qnode *) next;
} ct_qnode;

typedef struct ct_queue {
    CT_ALIGNED _Atomic(ct_qnode *) head;   /* producers' end: last pushed */
    CT_ALIGNED ct_qnode *tail;             /* consumers' end (pop lock held) */
    ct_qnode stub;
} ct_queue;

void ct_queue_init(ct_queue *q);
/* Any thread, any time. */
void ct_queue_push(ct_queue *q, ct_qnode *n);
/* Pop lock held. NULL when empty, or when a producer is between its exchange and its link
 * (the element becomes visible a few instructions later; the producer then wakes sleepers). */
ct_qnode *ct_queue_pop(ct_queue *q);

#endif
