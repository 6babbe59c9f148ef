/* agentd regions from inside a job: link with -lagentd_region.
 *
 * A region is a named byte range the supervisor serves lazily: open it, read it like
 * memory, and each page appears when first touched. A page the supervisor cannot serve
 * (a failing backing store, a revoked region, a broker that went away) raises SIGBUS at
 * the access; agentd_region_failure() then says why.
 *
 *   agentd_region *r = agentd_region_open("index", 0);
 *   if (!r) { fprintf(stderr, "%s\n", agentd_region_last_error()); return 1; }
 *   const unsigned char *p = agentd_region_data(r);
 *   ... p[0 .. agentd_region_size(r)) ...
 *   agentd_region_close(r);
 *
 * The broker is found at $AGENTD_REGIONS_SOCKET, else /run/agentd/regions.sock. A job
 * may open only the regions it was started with (agentctl run --region NAME[:rw]);
 * read-only regions are mapped PROT_READ. Handles are thread-safe to read from.
 */
#ifndef AGENTD_REGION_H
#define AGENTD_REGION_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct agentd_region agentd_region;

/* NULL on failure: agentd_region_last_error() says why (not granted, revoked, ...). */
agentd_region *agentd_region_open(const char *name, int writable);
/* This thread's last error text, or NULL. Valid until this thread's next call. */
const char *agentd_region_last_error(void);
const void *agentd_region_data(const agentd_region *r);
uint64_t agentd_region_size(const agentd_region *r);
uint64_t agentd_region_generation(const agentd_region *r);
/* The last failure the supervisor announced for this handle, or NULL. */
const char *agentd_region_failure(const agentd_region *r);
/* Unmaps and closes; a writable region's writes are kept by the supervisor. */
void agentd_region_close(agentd_region *r);

#ifdef __cplusplus
}
#endif
#endif
