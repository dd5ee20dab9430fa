//! The one way the CPU kernels (`attn_cpu`, `dense`) call gemm: f32, row-major output and
//! left operand, the output overwritten (never read), no conjugation.

use gemm::Parallelism;

/// `dst = lhs · rhs` for an (m, k) `lhs` with rows `lhs_rs` apart and a (k, n) `rhs` with strides
/// (`rhs_rs`, `rhs_cs`), into an (m, n) `dst` with rows `dst_rs` apart.
///
/// # Safety
///
/// Every element the dims and strides address must lie inside its allocation; `dst` must be
/// valid for writes there and not overlap the operands. `dst` may be uninitialised: with k > 0
/// every addressed element is written without being read.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn overwrite(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs,
        1,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}
