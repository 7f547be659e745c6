/* ct_queue.c - see ct_queue.h (Vyukov's intrusive MPSC queue, consumers serialised). */
#include "ct_queue.h"

void ct_queue_init(ct_queue *q) {
    atomic_store_explicit(&q->stub.next, NULL, memory_order_relaxed);
    atomic_store_explicit(&q->head, &q->stub, memory_order_relaxed);
    q->tail = &q->stub;
}

void ct_queue_push(ct_queue *q, ct_qnode *n) {
    atomic_store_explicit(&n->next, NULL, memory_order_relaxed);
    /* acq_rel: release publishes n's contents (and its next=NULL) to whoever later reads
     * prev->next; acquire orders against the previous pusher's store into prev. */
    ct_qnode *prev = atomic_exchange_explicit(&q->head, n, memory_order_acq_rel);
    /* Between the exchange and this store the list is cut: consumers see prev as the last
     * element until the link lands. That is the only window where pop returns NULL while
     * elements exist. */
    atomic_store_explicit(&prev->next, n, memory_order_release);
}

ct_qnode *ct_queue_pop(ct_queue *q) {
    ct_qnode *tail = q->tail;
    ct_qnode *next = atomic_load_explicit(&tail->next, memory_order_acquire);
    if (tail == &q->stub) {
        if (next == NULL) return NULL;
        q->tail = next;
        tail = next;
        next = atomic_load_explicit(&next->next, memory_order_acquire);
    }
    if (next) {
        q->tail = next;
        return tail;
    }
    ct_qnode *head = atomic_load_explicit(&q->head, memory_order_acquire);
    if (tail != head) return NULL;   /* a producer is linking after tail */
    /* tail is the only element: push the stub behind it so tail can be handed out. */
    ct_queue_push(q, &q->stub);
    next = atomic_load_explicit(&tail->next, memory_order_acquire);
    if (next) {
        q->tail = next;
        return tail;
    }
    return NULL;
}
