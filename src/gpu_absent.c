/* gpu_absent.c - TEMPORARY: weak GPU hooks so the library links while the GPU backend is being
 * written (src/gpu_context.c, src/gpu_attention.c replace every one of these). Each says so. */
#include "internal.h"

#define ABSENT(fn) set_error(KVATTN_ERROR_BACKEND_UNAVAILABLE, "%s: this build has no GPU backend", fn)

__attribute__((weak)) kvattn_status gpu_context_init(kvattn_context *ctx) { return ABSENT("gpu_context_init"); }
__attribute__((weak)) void gpu_context_release(kvattn_context *ctx) {}
__attribute__((weak)) kvattn_status gpu_attention_init(kvattn_attention *a) { return ABSENT("gpu_attention_init"); }
__attribute__((weak)) void gpu_attention_release(kvattn_attention *a) {}
__attribute__((weak)) kvattn_status gpu_workspace_size(kvattn_context *c, const kvattn_attention_desc *d,
                                                       const kvattn_bounds *b, size_t *x, size_t *y) {
  return ABSENT("gpu_workspace_size");
}
__attribute__((weak)) kvattn_status gpu_alloc(kvattn_context *c, size_t a, size_t b, kvattn_workspace *w) {
  return ABSENT("gpu_alloc");
}
__attribute__((weak)) kvattn_status gpu_free(kvattn_context *c, kvattn_workspace *w) { return ABSENT("gpu_free"); }
__attribute__((weak)) kvattn_status gpu_plan(kvattn_attention *a, const batch_view *bv, const kvattn_workspace *ws,
                                             kvattn_stream s) {
  return ABSENT("gpu_plan");
}
__attribute__((weak)) kvattn_status gpu_run(kvattn_attention *a, const run_tensors *t, kvattn_stream s) {
  return ABSENT("gpu_run");
}
__attribute__((weak)) kvattn_status gpu_merge_states(kvattn_context *c, const tview *v, const tview *s,
                                                     const tview *vo, const tview *so, kvattn_stream st) {
  return ABSENT("gpu_merge_states");
}
__attribute__((weak)) kvattn_status gpu_append_paged_kv(kvattn_context *ctx, const tview *k_new, const tview *v_new,
                                                        const tview *bi, const tview *pos, const tview *k,
                                                        const tview *v, const tview *ix, const tview *ip,
                                                        kvattn_stream s) {
  return ABSENT("gpu_append_paged_kv");
}
__attribute__((weak)) kvattn_status cpu_attention_reference(const cpu_problem *p) {
  return set_error(KVATTN_ERROR_UNSUPPORTED, "reference backend not built yet");
}
__attribute__((weak)) kvattn_status cpu_attention_fast(const cpu_problem *p, int n) {
  return set_error(KVATTN_ERROR_UNSUPPORTED, "cpu backend not built yet");
}
__attribute__((weak)) kvattn_status cpu_merge_states(const tview *v, const tview *s, const tview *vo, const tview *so,
                                                     int n) {
  return set_error(KVATTN_ERROR_UNSUPPORTED, "cpu merge not built yet");
}
