//! ResNet-18/34/50/101/152 (torchvision's v1.5: stride on the 3x3 convolution) that
//! trains: BatchNorm with batch statistics, max-pool with a backward, a head sized to the
//! task. Variables carry torchvision's names (`conv1.weight`, `layer1.0.bn1.running_mean`,
//! `fc.bias`); [`checkpoint`] also reads Hugging Face `microsoft/resnet-*` files.
//! BatchNorm can be frozen for fine-tuning ([`ResNet::set_batch_norm_frozen`]).

pub mod checkpoint;

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use super::batch_norm::BatchNorm2d;
use crate::Error;
use crate::ops::conv2d::{Conv2dParams, conv2d};
use crate::ops::max_pool::MaxPool2d;
use crate::ops::residual::add_relu;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34).
    Basic,
    /// 1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50 and deeper).
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The architectures torchvision and Hugging Face publish: depth, blocks per stage, block.
const ARCHITECTURES: [(usize, [usize; 4], BlockKind); 5] = [
    (18, [2, 2, 2, 2], BlockKind::Basic),
    (34, [3, 4, 6, 3], BlockKind::Basic),
    (50, [3, 4, 6, 3], BlockKind::Bottleneck),
    (101, [3, 4, 23, 3], BlockKind::Bottleneck),
    (152, [3, 8, 36, 3], BlockKind::Bottleneck),
];

fn supported_depths() -> String {
    ARCHITECTURES
        .map(|(depth, _, _)| depth.to_string())
        .join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetConfig {
    pub depth: usize,
    pub blocks: [usize; 4],
    pub block: BlockKind,
    pub num_classes: usize,
}

impl ResNetConfig {
    pub fn new(depth: usize, num_classes: usize) -> crate::Result<Self> {
        ARCHITECTURES
            .iter()
            .find(|(d, _, _)| *d == depth)
            .map(|&(depth, blocks, block)| Self {
                depth,
                blocks,
                block,
                num_classes,
            })
            .ok_or_else(|| {
                Error::Architecture(format!(
                    "ResNet-{depth}; supported depths: {}",
                    supported_depths()
                ))
            })
    }

    /// The architecture with these blocks per stage, if it is a known one.
    pub fn from_blocks(
        blocks: [usize; 4],
        block: BlockKind,
        num_classes: usize,
    ) -> crate::Result<Self> {
        ARCHITECTURES
            .iter()
            .find(|(_, b, k)| *b == blocks && *k == block)
            .map(|&(depth, _, _)| Self::new(depth, num_classes))
            .unwrap_or_else(|| {
                Err(Error::Architecture(format!(
                    "ResNet with {blocks:?} {block:?} blocks per stage; supported depths: {}",
                    supported_depths()
                )))
            })
    }

    /// Channels entering the classifier.
    pub fn feature_dim(&self) -> usize {
        512 * self.block.expansion()
    }
}

/// Convolution without bias followed by BatchNorm.
#[derive(Debug, Clone)]
struct ConvBn {
    weight: Tensor,
    params: Conv2dParams,
    bn: BatchNorm2d,
}

impl ConvBn {
    fn new(
        (in_c, out_c, kernel, stride): (usize, usize, usize, usize),
        conv_vb: VarBuilder,
        bn_vb: VarBuilder,
    ) -> Result<Self> {
        let shape = (out_c, in_c, kernel, kernel);
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Ok(Self {
            weight: conv_vb.get_with_hints(shape, "weight", init)?,
            params: Conv2dParams {
                stride,
                padding: kernel / 2,
            },
            bn: BatchNorm2d::new(out_c, bn_vb)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn
            .forward_t(&conv2d(x, &self.weight, self.params)?, train)
    }

    fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn
            .forward_relu_t(&conv2d(x, &self.weight, self.params)?, train)
    }
}

/// A residual block: `relu(convs(x) + shortcut(x))`, ReLU between the convolutions.
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        kind: BlockKind,
        in_c: usize,
        width: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let out_c = width * kind.expansion();
        let shapes = match kind {
            BlockKind::Basic => vec![(in_c, width, 3, stride), (width, width, 3, 1)],
            BlockKind::Bottleneck => vec![
                (in_c, width, 1, 1),
                (width, width, 3, stride),
                (width, out_c, 1, 1),
            ],
        };
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(i, shape)| {
                ConvBn::new(
                    shape,
                    vb.pp(format!("conv{}", i + 1)),
                    vb.pp(format!("bn{}", i + 1)),
                )
            })
            .collect::<Result<_>>()?;
        let downsample = if stride != 1 || in_c != out_c {
            let vb = vb.pp("downsample");
            Some(ConvBn::new(
                (in_c, out_c, 1, stride),
                vb.pp("0"),
                vb.pp("1"),
            )?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (last, inner) = self.convs.split_last().expect("a block has convolutions");
        let mut y = x.clone();
        for conv in inner {
            y = conv.forward_relu_t(&y, train)?;
        }
        let y = last.forward_t(&y, train)?;
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.forward_t(x, train)?,
            None => x.clone(),
        };
        add_relu(&y, &shortcut)
    }
}

#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    stem: ConvBn,
    pool: MaxPool2d,
    blocks: Vec<Block>,
    fc: Linear,
}

impl ResNet {
    /// Builds the model from `vb` (torchvision names); missing variables are initialised
    /// as candle's layers do (Kaiming normal convolutions, BatchNorm 1/0).
    pub fn new(config: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let stem = ConvBn::new((3, 64, 7, 2), vb.pp("conv1"), vb.pp("bn1"))?;
        let mut blocks = Vec::new();
        let mut in_c = 64;
        for (stage, &count) in config.blocks.iter().enumerate() {
            let width = 64 << stage;
            let stage_vb = vb.pp(format!("layer{}", stage + 1));
            for i in 0..count {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                blocks.push(Block::new(
                    config.block,
                    in_c,
                    width,
                    stride,
                    stage_vb.pp(i.to_string()),
                )?);
                in_c = width * config.block.expansion();
            }
        }
        Ok(Self {
            config: *config,
            stem,
            pool: MaxPool2d::new(3, 2, 1)?,
            blocks,
            fc: candle_nn::linear(config.feature_dim(), config.num_classes, vb.pp("fc"))?,
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Frozen BatchNorm (detectron2's `FrozenBatchNorm2d`, torchvision's fine-tuning
    /// practice): every BatchNorm normalises with its running statistics in training too
    /// and stops updating them, so small or per-rank batches do not disturb pretrained
    /// statistics and a sample's output does not depend on its batch. Their weights and
    /// biases still train; the trainer freezes them by name with
    /// `--freeze 're:(bn\d+|downsample\.1)\.(weight|bias)$'`.
    pub fn set_batch_norm_frozen(&mut self, frozen: bool) {
        let block_convs = self
            .blocks
            .iter_mut()
            .flat_map(|b| b.convs.iter_mut().chain(b.downsample.as_mut()));
        for conv in std::iter::once(&mut self.stem).chain(block_convs) {
            conv.bn.set_frozen(frozen);
        }
    }
}

impl ModuleT for ResNet {
    /// NCHW images to `(N, num_classes)` logits; `train` selects batch statistics.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.pool.forward(&self.stem.forward_relu_t(x, train)?)?;
        for block in &self.blocks {
            x = block.forward_t(&x, train)?;
        }
        self.fc.forward(&x.mean((2, 3))?)
    }
}
