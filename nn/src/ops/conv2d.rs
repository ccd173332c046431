//! 2-D convolution (no bias, no groups, no dilation) whose CPU backward is two matrix
//! products per group of images, like its forward.
//!
//! candle's CPU backward of `conv2d` computes the input gradient with a direct-loop
//! `conv_transpose2d` and the kernel gradient as a convolution whose kernel is the whole
//! output gradient; on ResNet-18 that makes backward several times the forward. Here all
//! three products go through im2col and `gemm`: forward `Y = W · col(x)`, kernel gradient
//! `dW = dY · col(x)ᵀ`, input gradient `dx = col⁻¹(Wᵀ · dY)`. Images are processed in
//! groups wide enough for an efficient product, one group per task, so the threads never
//! synchronise inside a product. Other devices use candle's `conv2d`.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::float::{Real, add_partials, dispatch_real, output_buffer};
use super::matmul::{Matrix, matmul};

/// Marks a tap that reads padding (no plane is this large).
const PADDING: u32 = u32::MAX;

/// Square stride and padding of a convolution; the kernel size comes from the weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

/// Convolves NCHW `x` with `weight` `(C_out, C_in, KH, KW)`; differentiable in both.
pub fn conv2d(x: &Tensor, weight: &Tensor, params: Conv2dParams) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => x.contiguous()?.apply_op2(&weight.contiguous()?, params),
        _ => x.conv2d(weight, params.padding, params.stride, 1, 1),
    }
}

/// Sizes of one convolution, and the im2col matrix `K x L` of one image.
#[derive(Debug, Clone)]
struct Geometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    out_h: usize,
    out_w: usize,
    stride: usize,
    padding: usize,
    /// The kernel taps `(ky, kx)` that read the image for at least one output pixel. On
    /// small planes (ResNet's last stage on 32x32 images: 1x1 and 2x2) most taps only
    /// ever read padding; their im2col rows would be zeros, so they are left out of the
    /// products, and their kernel gradient is zero.
    live: Vec<(usize, usize)>,
}

impl Geometry {
    fn new(x: &Layout, weight: &Layout, p: Conv2dParams) -> Result<Self> {
        let (batch, c_in, h, w) = x.shape().dims4()?;
        let (c_out, wc_in, kh, kw) = weight.shape().dims4()?;
        if wc_in != c_in {
            bail!(
                "conv2d: input has {c_in} channels, the weight {:?} expects {wc_in}",
                weight.shape()
            );
        }
        if p.stride == 0 || h + 2 * p.padding < kh || w + 2 * p.padding < kw {
            bail!(
                "conv2d: input {h}x{w} with padding {} does not fit kernel {kh}x{kw} (stride {})",
                p.padding,
                p.stride
            );
        }
        let mut g = Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            out_h: (h + 2 * p.padding - kh) / p.stride + 1,
            out_w: (w + 2 * p.padding - kw) / p.stride + 1,
            stride: p.stride,
            padding: p.padding,
            live: vec![],
        };
        g.live = (0..kh)
            .filter(|&ky| !g.valid(ky, h, g.out_h).is_empty())
            .flat_map(|ky| {
                (0..kw)
                    .filter(|&kx| !g.valid(kx, w, g.out_w).is_empty())
                    .map(move |kx| (ky, kx))
            })
            .collect();
        Ok(g)
    }

    fn all_taps_live(&self) -> bool {
        self.live.len() == self.kh * self.kw
    }

    /// The weight `(C_out, K)` over the live taps only.
    fn live_weight<'a, T: Real>(&self, weight: &'a [T]) -> Cow<'a, [T]> {
        if self.all_taps_live() {
            return Cow::Borrowed(weight);
        }
        let plane = self.kh * self.kw;
        weight
            .chunks_exact(plane)
            .flat_map(|taps| self.live.iter().map(|&(ky, kx)| taps[ky * self.kw + kx]))
            .collect()
    }

    /// Spreads a kernel gradient over the live taps onto the whole kernel (zeros elsewhere).
    fn spread_kernel_grad<T: Real>(&self, live_grad: &[T], grad: &mut [T]) {
        if self.all_taps_live() {
            grad.copy_from_slice(live_grad);
            return;
        }
        let plane = self.kh * self.kw;
        for (taps, live) in grad
            .chunks_exact_mut(plane)
            .zip(live_grad.chunks_exact(self.live.len()))
        {
            for (&(ky, kx), &v) in self.live.iter().zip(live) {
                taps[ky * self.kw + kx] = v;
            }
        }
    }

    /// Rows of the im2col matrix: one per (input channel, kernel row, kernel column).
    fn k(&self) -> usize {
        self.c_in * self.live.len()
    }

    /// Columns per image: one per output pixel.
    fn l(&self) -> usize {
        self.out_h * self.out_w
    }

    fn in_image(&self) -> usize {
        self.c_in * self.h * self.w
    }

    fn out_image(&self) -> usize {
        self.c_out * self.l()
    }

    /// Images per task: enough output columns for an efficient product, but at least
    /// as many tasks as threads.
    fn group(&self) -> usize {
        let wide_enough = 512usize.div_ceil(self.l());
        let per_thread = self.batch.div_ceil(rayon::current_num_threads());
        wide_enough.min(per_thread).max(1)
    }

    /// The output positions along one axis (input `size`) whose kernel tap `k` falls
    /// inside the image; the rest read padding.
    fn valid(&self, k: usize, size: usize, out: usize) -> Range<usize> {
        let lo = self.padding.saturating_sub(k).div_ceil(self.stride);
        let hi = match (size + self.padding).checked_sub(k + 1) {
            Some(last) => (last / self.stride + 1).min(out),
            None => 0,
        };
        lo..hi.max(lo)
    }

    /// Input index of output position `o` for kernel tap `k`, for `o` in [`Self::valid`].
    fn source(&self, o: usize, k: usize) -> usize {
        o * self.stride + k - self.padding
    }

    /// For small outputs, per-row bookkeeping costs more than the copying: then a table
    /// gives, for each kernel tap and output pixel, the input pixel (within a plane) it
    /// reads, `PADDING` for none. Wide rows are copied as slices instead.
    fn taps(&self) -> Option<Vec<u32>> {
        if self.out_w >= 32 {
            return None;
        }
        let mut taps = Vec::with_capacity(self.live.len() * self.l());
        for &(ky, kx) in &self.live {
            let (ys, xs) = (
                self.valid(ky, self.h, self.out_h),
                self.valid(kx, self.w, self.out_w),
            );
            for oy in 0..self.out_h {
                for ox in 0..self.out_w {
                    taps.push(if ys.contains(&oy) && xs.contains(&ox) {
                        (self.source(oy, ky) * self.w + self.source(ox, kx)) as u32
                    } else {
                        PADDING
                    });
                }
            }
        }
        Some(taps)
    }

    /// Writes the im2col matrix of `images` (consecutive NCHW images) into `col`, a
    /// `K x (images * L)` row-major matrix with the images side by side.
    fn im2col<T: Real>(&self, images: &[T], col: &mut [T], taps: Option<&[u32]>) {
        let (l, width) = (self.l(), images.len() / self.in_image() * self.l());
        if let Some(taps) = taps {
            for (g, image) in images.chunks_exact(self.in_image()).enumerate() {
                for (row, (plane, taps)) in self.planes_by_tap(image, taps).enumerate() {
                    let dst = &mut col[row * width + g * l..][..l];
                    for (d, &i) in dst.iter_mut().zip(taps) {
                        *d = plane.get(i as usize).copied().unwrap_or(T::zero());
                    }
                }
            }
            return;
        }
        for (g, image) in images.chunks_exact(self.in_image()).enumerate() {
            for (row, (c, ky, kx)) in self.rows().enumerate() {
                let plane = &image[c * self.h * self.w..][..self.h * self.w];
                let dst = &mut col[row * width + g * l..][..l];
                let (ys, xs) = (
                    self.valid(ky, self.h, self.out_h),
                    self.valid(kx, self.w, self.out_w),
                );
                for (oy, dst) in dst.chunks_exact_mut(self.out_w).enumerate() {
                    if !ys.contains(&oy) || xs.is_empty() {
                        dst.fill(T::zero());
                        continue;
                    }
                    dst[..xs.start].fill(T::zero());
                    dst[xs.end..].fill(T::zero());
                    let src = &plane[self.source(oy, ky) * self.w + self.source(xs.start, kx)..];
                    let dst = &mut dst[xs.clone()];
                    if self.stride == 1 {
                        dst.copy_from_slice(&src[..dst.len()]);
                    } else {
                        dst.iter_mut()
                            .zip(src.iter().step_by(self.stride))
                            .for_each(|(d, &s)| *d = s);
                    }
                }
            }
        }
    }

    /// The inverse of [`Self::im2col`]: adds every entry of `col` into the input pixel it
    /// came from.
    fn col2im<T: Real>(&self, col: &[T], images: &mut [T], taps: Option<&[u32]>) {
        let (l, width) = (self.l(), images.len() / self.in_image() * self.l());
        if let Some(taps) = taps {
            let plane_len = self.h * self.w;
            for (g, image) in images.chunks_exact_mut(self.in_image()).enumerate() {
                for (c, plane) in image.chunks_exact_mut(plane_len).enumerate() {
                    for (tap, taps) in taps.chunks_exact(l).enumerate() {
                        let row = c * self.live.len() + tap;
                        let src = &col[row * width + g * l..][..l];
                        for (&s, &i) in src.iter().zip(taps) {
                            if let Some(d) = plane.get_mut(i as usize) {
                                *d += s;
                            }
                        }
                    }
                }
            }
            return;
        }
        for (g, image) in images.chunks_exact_mut(self.in_image()).enumerate() {
            for (row, (c, ky, kx)) in self.rows().enumerate() {
                let plane = &mut image[c * self.h * self.w..][..self.h * self.w];
                let src = &col[row * width + g * l..][..l];
                let (ys, xs) = (
                    self.valid(ky, self.h, self.out_h),
                    self.valid(kx, self.w, self.out_w),
                );
                if xs.is_empty() {
                    continue;
                }
                for oy in ys {
                    let src = &src[oy * self.out_w..][xs.clone()];
                    let dst =
                        &mut plane[self.source(oy, ky) * self.w + self.source(xs.start, kx)..];
                    if self.stride == 1 {
                        // A plain zip vectorises; `step_by` does not.
                        dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
                    } else {
                        dst.iter_mut()
                            .step_by(self.stride)
                            .zip(src)
                            .for_each(|(d, &s)| *d += s);
                    }
                }
            }
        }
    }

    /// For each im2col row in order: the input plane it reads and that tap's table.
    fn planes_by_tap<'a, T>(
        &self,
        image: &'a [T],
        taps: &'a [u32],
    ) -> impl Iterator<Item = (&'a [T], &'a [u32])> {
        let l = self.l();
        image
            .chunks_exact(self.h * self.w)
            .flat_map(move |plane| taps.chunks_exact(l).map(move |taps| (plane, taps)))
    }

    fn rows(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.c_in).flat_map(move |c| self.live.iter().map(move |&(ky, kx)| (c, ky, kx)))
    }

    /// Copies group outputs between NCHW images and the `C_out x (images * L)` matrix.
    fn scatter_out<T: Real>(&self, matrix: &[T], images: &mut [T]) {
        let (l, width) = (self.l(), images.len() / self.out_image() * self.l());
        for (g, image) in images.chunks_exact_mut(self.out_image()).enumerate() {
            for (c, dst) in image.chunks_exact_mut(l).enumerate() {
                dst.copy_from_slice(&matrix[c * width + g * l..][..l]);
            }
        }
    }

    fn gather_out<T: Real>(&self, images: &[T], matrix: &mut [T]) {
        let (l, width) = (self.l(), images.len() / self.out_image() * self.l());
        for (g, image) in images.chunks_exact(self.out_image()).enumerate() {
            for (c, src) in image.chunks_exact(l).enumerate() {
                matrix[c * width + g * l..][..l].copy_from_slice(src);
            }
        }
    }
}

impl Conv2dParams {
    fn forward<T: Real>(&self, x: &[T], weight: &[T], g: &Geometry) -> Vec<T> {
        let (group, taps, weight) = (g.group(), g.taps(), g.live_weight(weight));
        let mut out = output_buffer(g.batch * g.out_image());
        out.par_chunks_mut(group * g.out_image())
            .zip(x.par_chunks(group * g.in_image()))
            .for_each_init(
                // Both are written before they are read: im2col fills every column it
                // hands to the product, which overwrites `product`.
                || {
                    (
                        output_buffer(g.k() * group * g.l()),
                        output_buffer(group * g.out_image()),
                    )
                },
                |(col, product), (out, x)| {
                    let width = x.len() / g.in_image() * g.l();
                    g.im2col(x, col, taps.as_deref());
                    let shape = (g.c_out, width, g.k());
                    let (weight, col) = (
                        Matrix::row_major(&weight, g.k()),
                        Matrix::row_major(col, width),
                    );
                    // One image's output already is the `C_out x L` matrix.
                    if width == g.l() {
                        matmul(out, shape, weight, col, false);
                    } else {
                        let product = &mut product[..g.c_out * width];
                        matmul(product, shape, weight, col, false);
                        g.scatter_out(product, out);
                    }
                },
            );
        out
    }

    /// `[dx | dW]` in one buffer; `dx` stays zero (and its pages untouched) unless
    /// `input_grad`.
    fn backward<T: Real>(
        &self,
        x: &[T],
        weight: &[T],
        dy: &[T],
        g: &Geometry,
        input_grad: bool,
    ) -> Vec<T> {
        let (group, taps, weight) = (g.group(), g.taps(), g.live_weight(weight));
        let kernel_len = g.c_out * g.k();
        let mut out = vec![T::zero(); x.len() + g.c_out * g.c_in * g.kh * g.kw];
        let (dx, dw) = out.split_at_mut(x.len());
        let per_task_dw = dx
            .par_chunks_mut(group * g.in_image())
            .zip(
                x.par_chunks(group * g.in_image())
                    .zip(dy.par_chunks(group * g.out_image())),
            )
            .fold(
                // im2col and gather_out write what the products read.
                || {
                    let buffers = (
                        output_buffer(g.k() * group * g.l()),
                        output_buffer(group * g.out_image()),
                    );
                    (vec![T::zero(); kernel_len], buffers)
                },
                |(mut dw, (mut col, mut dy_buffer)), (dx, (x, dy))| {
                    let width = x.len() / g.in_image() * g.l();
                    // One image's gradient already is the `C_out x L` matrix.
                    let dy_matrix = if width == g.l() {
                        dy
                    } else {
                        g.gather_out(dy, &mut dy_buffer[..g.c_out * width]);
                        &dy_buffer[..g.c_out * width]
                    };
                    g.im2col(x, &mut col, taps.as_deref());
                    // dW += dY · col(x)ᵀ
                    let shape = (g.c_out, g.k(), width);
                    matmul(
                        &mut dw,
                        shape,
                        Matrix::row_major(dy_matrix, width),
                        Matrix::transposed(&col, width),
                        true,
                    );
                    if input_grad {
                        // col(dx) = Wᵀ · dY, then folded back onto the images.
                        let dcol = &mut col[..g.k() * width];
                        let shape = (g.k(), width, g.c_out);
                        matmul(
                            dcol,
                            shape,
                            Matrix::transposed(&weight, g.k()),
                            Matrix::row_major(dy_matrix, width),
                            false,
                        );
                        g.col2im(dcol, dx, taps.as_deref());
                    }
                    (dw, (col, dy_buffer))
                },
            )
            .map(|(dw, _)| dw)
            .reduce_with(add_partials);
        if let Some(sum) = per_task_dw {
            g.spread_kernel_grad(&sum, dw);
        }
        out
    }
}

impl CustomOp2 for Conv2dParams {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(x_l, w_l, *self)?;
        let out = dispatch_real!(x, self.name(), |T| {
            let x = T::elements(x, x_l, self.name())?;
            let w = T::elements(w, w_l, self.name())?;
            T::storage(self.forward(x, w, &g))
        });
        Ok((out, Shape::from((g.batch, g.c_out, g.out_h, g.out_w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The images entering the stem need no gradient: skip half of its backward.
        let input_grad = x.track_op();
        let backward = Conv2dBackward {
            params: *self,
            input_grad,
        };
        let packed = x.apply_op3_no_bwd(weight, &grad_res.contiguous()?, &backward)?;
        let n = x.elem_count();
        let grad_x = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let grad_w = packed
            .narrow(0, n, weight.elem_count())?
            .reshape(weight.shape())?;
        Ok((input_grad.then_some(grad_x), Some(grad_w)))
    }
}

/// `(x, weight, dy) -> [dx | dW]` for [`Conv2dParams`].
struct Conv2dBackward {
    params: Conv2dParams,
    input_grad: bool,
}

impl candle_core::CustomOp3 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "conv2d_backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        dy: &CpuStorage,
        dy_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(x_l, w_l, self.params)?;
        if dy_l.shape().dims() != [g.batch, g.c_out, g.out_h, g.out_w] {
            bail!(
                "conv2d_backward: gradient shape {:?} does not match the output",
                dy_l.shape()
            );
        }
        let out = dispatch_real!(x, self.name(), |T| {
            let x = T::elements(x, x_l, self.name())?;
            let w = T::elements(w, w_l, self.name())?;
            let dy = T::elements(dy, dy_l, self.name())?;
            T::storage(self.params.backward(x, w, dy, &g, self.input_grad))
        });
        Ok((
            out,
            Shape::from(x_l.shape().elem_count() + w_l.shape().elem_count()),
        ))
    }
}
