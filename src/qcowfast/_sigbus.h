/* Reading file mappings that may lose their pages: a file truncated after it was mapped makes
 * every access past its new end raise SIGBUS, which would end the process. qf_bus_call() runs
 * a function with a guard over one address range: a SIGBUS inside that range, in this thread,
 * returns from qf_bus_call() with *faulted set instead. Other SIGBUS go to the handler that was
 * installed before (Python's faulthandler, or the default action).
 *
 * Each module including this header installs its own handler once, at import (never again:
 * two modules re-installing in turn would make each other's previous handler, a loop).
 */
#ifndef QF_SIGBUS_H
#define QF_SIGBUS_H

#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>

typedef int (*qf_guarded_fn)(void *arg);

typedef struct {
    sigjmp_buf env;
    const char *lo, *hi;
} qf_bus_guard;

static __thread qf_bus_guard *qf_bus_active = NULL;
static struct sigaction qf_bus_prev;
static int qf_bus_installed = 0;

static void qf_bus_handler(int sig, siginfo_t *si, void *uc)
{
    qf_bus_guard *g = qf_bus_active;
    const char *addr = (const char *)si->si_addr;
    if (g != NULL && addr >= g->lo && addr < g->hi) {
        qf_bus_active = NULL;
        siglongjmp(g->env, 1);
    }
    if (qf_bus_prev.sa_flags & SA_SIGINFO) {
        if (qf_bus_prev.sa_sigaction != NULL) {
            qf_bus_prev.sa_sigaction(sig, si, uc);
            return;
        }
    } else if (qf_bus_prev.sa_handler != SIG_DFL && qf_bus_prev.sa_handler != SIG_IGN) {
        qf_bus_prev.sa_handler(sig);
        return;
    }
    /* The default action: returning repeats the access, which then ends the process. */
    signal(sig, SIG_DFL);
}

/* Install the handler (once per module); 0 on success. Call with the GIL held. */
static int qf_bus_install(void)
{
    struct sigaction sa;
    if (qf_bus_installed)
        return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = qf_bus_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &qf_bus_prev) != 0)
        return -1;
    qf_bus_installed = 1;
    return 0;
}

/* fn(arg), with SIGBUS at [lo, lo + len) caught: then *faulted = 1 and -1 is returned (fn was
 * cut short: it must leave nothing half-updated that its caller would use). */
static int qf_bus_call(qf_guarded_fn fn, void *arg, const void *lo, size_t len, int *faulted)
{
    qf_bus_guard guard;
    qf_bus_guard *volatile outer = qf_bus_active;
    int rc;
    *faulted = 0;
    guard.lo = (const char *)lo;
    guard.hi = (const char *)lo + len;
    if (sigsetjmp(guard.env, 1)) {
        qf_bus_active = outer;
        *faulted = 1;
        return -1;
    }
    qf_bus_active = &guard;
    rc = fn(arg);
    qf_bus_active = outer;
    return rc;
}

#endif
