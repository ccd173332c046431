//! BERT encoder and the sequence-classification head, as Hugging Face transformers
//! computes them, with dropout active only when training.

use super::config::{BertConfig, HiddenAct};
use super::layers::{
    Dense, Norm, ResidualNorm, SelfAttention, attention_bias, dropout, masked_mean,
};
use candle_core::{DType, IndexOp, Result, Tensor, bail};
use candle_nn::{Embedding, Init, VarBuilder};

/// One batch of token ids, all (batch, seq).
#[derive(Debug, Clone)]
pub struct BertInput {
    /// u32 token ids.
    pub input_ids: Tensor,
    /// u32 segment ids; zeros when absent.
    pub token_type_ids: Option<Tensor>,
    /// 1 for tokens to attend to, 0 for padding (any dtype); all ones when absent.
    pub attention_mask: Option<Tensor>,
}

struct Embeddings {
    words: Embedding,
    positions: Embedding,
    token_types: Embedding,
    norm: Norm,
    dropout: f64,
    max_positions: usize,
}

impl Embeddings {
    fn new(vb: VarBuilder, c: &BertConfig) -> Result<Self> {
        let table = |name: &str, rows: usize| -> Result<Embedding> {
            let init = Init::Randn {
                mean: 0.,
                stdev: c.initializer_range,
            };
            let weight = vb
                .pp(name)
                .get_with_hints((rows, c.hidden_size), "weight", init)?;
            Ok(Embedding::new(weight, c.hidden_size))
        };
        Ok(Self {
            words: table("word_embeddings", c.vocab_size)?,
            positions: table("position_embeddings", c.max_position_embeddings)?,
            token_types: table("token_type_embeddings", c.type_vocab_size)?,
            norm: Norm::new(vb.pp("LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
            dropout: c.hidden_dropout_prob,
            max_positions: c.max_position_embeddings,
        })
    }

    fn forward(&self, input: &BertInput, train: bool) -> Result<Tensor> {
        use candle_core::Module;
        let ids = &input.input_ids;
        let (batch, seq) = ids.dims2()?;
        if seq > self.max_positions {
            bail!(
                "bert: sequence length {seq} exceeds max_position_embeddings {}",
                self.max_positions
            )
        }
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let token_types = match &input.token_type_ids {
            Some(t) => t.clone(),
            None => Tensor::zeros((batch, seq), DType::U32, ids.device())?,
        };
        let x = self
            .words
            .forward(ids)?
            .add(&self.token_types.forward(&token_types)?)?
            .broadcast_add(&self.positions.forward(&positions)?)?;
        dropout(&self.norm.forward(&x)?, self.dropout, train)
    }

    /// (total tokens, hidden) for sequences packed end to end, positions restarting at 0
    /// in each.
    fn forward_packed(&self, sequences: &[Sequence]) -> Result<Tensor> {
        use candle_core::Module;
        let device = self.words.embeddings().device();
        let total: usize = sequences.iter().map(|s| s.ids.len()).sum();
        let (mut ids, mut types, mut positions) = (
            Vec::with_capacity(total),
            Vec::with_capacity(total),
            Vec::with_capacity(total),
        );
        for sequence in sequences {
            let len = sequence.ids.len();
            if len == 0 || len > self.max_positions || sequence.types.len() != len {
                bail!(
                    "bert: a packed sequence needs 1 to {} tokens and one segment id per token \
                     (got {len} tokens, {} segment ids)",
                    self.max_positions,
                    sequence.types.len()
                )
            }
            ids.extend_from_slice(sequence.ids);
            types.extend_from_slice(sequence.types);
            positions.extend(0..len as u32);
        }
        let as_tensor = |v: Vec<u32>| Tensor::from_vec(v, total, device);
        let x = self
            .words
            .forward(&as_tensor(ids)?)?
            .add(&self.token_types.forward(&as_tensor(types)?)?)?
            .add(&self.positions.forward(&as_tensor(positions)?)?)?;
        self.norm.forward(&x)
    }
}

/// One unpadded sequence for [`BertForSequenceClassification::classify_packed`].
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    /// Token ids, [CLS] first.
    pub ids: &'a [u32],
    /// Segment ids, one per token.
    pub types: &'a [u32],
}

struct Layer {
    attention: SelfAttention,
    attention_output: ResidualNorm,
    intermediate: Dense,
    activation: HiddenAct,
    output: ResidualNorm,
}

impl Layer {
    fn new(vb: VarBuilder, c: &BertConfig) -> Result<Self> {
        let (h, eps, std) = (c.hidden_size, c.layer_norm_eps, c.initializer_range);
        Ok(Self {
            attention: SelfAttention::new(
                vb.pp("attention.self"),
                h,
                c.num_attention_heads,
                c.attention_probs_dropout_prob,
                std,
            )?,
            attention_output: ResidualNorm::new(
                vb.pp("attention.output"),
                h,
                h,
                eps,
                c.hidden_dropout_prob,
                std,
            )?,
            intermediate: Dense::new(vb.pp("intermediate.dense"), h, c.intermediate_size, std)?,
            activation: c.hidden_act,
            output: ResidualNorm::new(
                vb.pp("output"),
                c.intermediate_size,
                h,
                eps,
                c.hidden_dropout_prob,
                std,
            )?,
        })
    }

    /// The intermediate dense layer and its activation.
    fn intermediate_activation(&self, x: &Tensor) -> Result<Tensor> {
        match self.activation {
            HiddenAct::Gelu => self.intermediate.forward_gelu(x),
            HiddenAct::GeluTanh => self.intermediate.forward(x)?.gelu(),
            HiddenAct::Relu => self.intermediate.forward(x)?.relu(),
        }
    }

    /// x: (batch * seq, hidden).
    fn forward(
        &self,
        x: &Tensor,
        batch: usize,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let attended = self.attention.forward(x, batch, bias, train)?;
        let x = self.attention_output.forward(&attended, x, train)?;
        let inner = self.intermediate_activation(&x)?;
        self.output.forward(&inner, &x, train)
    }

    /// Inference over packed sequences of `lengths` tokens (see `BertModel::forward_packed`).
    fn forward_packed(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let attended = self.attention.forward_packed(x, lengths)?;
        let x = self.attention_output.forward(&attended, x, false)?;
        let inner = self.intermediate_activation(&x)?;
        self.output.forward(&inner, &x, false)
    }
}

/// The BERT encoder (`BertModel` without its pooler), variables under the `VarBuilder`'s
/// prefix (`bert.` in [`BertForSequenceClassification`]).
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl BertModel {
    pub fn new(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::new(vb.pp(format!("encoder.layer.{i}")), config))
            .collect::<Result<_>>()?;
        Ok(Self {
            embeddings: Embeddings::new(vb.pp("embeddings"), config)?,
            layers,
        })
    }

    /// The last hidden states, (batch, seq, hidden).
    pub fn forward_t(&self, input: &BertInput, train: bool) -> Result<Tensor> {
        let embedded = self.embeddings.forward(input, train)?;
        let (batch, seq, hidden) = embedded.dims3()?;
        let mut x = embedded.reshape((batch * seq, hidden))?;
        let bias = match &input.attention_mask {
            Some(mask) => Some(attention_bias(mask, x.dtype())?),
            None => None,
        };
        for layer in &self.layers {
            x = layer.forward(&x, batch, bias.as_ref(), train)?;
        }
        x.reshape((batch, seq, hidden))
    }

    /// Inference over sequences of different lengths packed end to end, without padding:
    /// the dense layers (most of the work) see only real tokens, attention runs within
    /// each sequence. Hidden states (total tokens, hidden). Fuses the attention weights on
    /// first use: for a model whose weights no longer change.
    pub fn forward_packed(&self, sequences: &[Sequence]) -> Result<Tensor> {
        let lengths: Vec<usize> = sequences.iter().map(|s| s.ids.len()).collect();
        let mut x = self.embeddings.forward_packed(sequences)?;
        for layer in &self.layers {
            x = layer.forward_packed(&x, &lengths)?;
        }
        Ok(x)
    }
}

/// How a sequence becomes one vector for the classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// Hugging Face `BertPooler`: tanh(dense(hidden of [CLS])).
    #[default]
    Cls,
    /// The mean of the hidden states of the unpadded tokens (sentence-transformers).
    Mean,
}

/// What [`BertForSequenceClassification::forward_t`] computes.
#[derive(Debug, Clone)]
pub struct ClassifierOutput {
    /// (batch, seq, hidden)
    pub hidden: Tensor,
    /// (batch, hidden)
    pub pooled: Tensor,
    /// (batch, num_labels)
    pub logits: Tensor,
}

/// Hugging Face `BertForSequenceClassification`: `bert.*` (encoder and, with
/// [`Pooling::Cls`], `bert.pooler.dense`), dropout, `classifier`.
pub struct BertForSequenceClassification {
    bert: BertModel,
    pooler: Option<Dense>,
    classifier: Dense,
    dropout: f64,
}

impl BertForSequenceClassification {
    pub fn new(
        vb: VarBuilder,
        config: &BertConfig,
        num_labels: usize,
        pooling: Pooling,
    ) -> Result<Self> {
        let (h, std) = (config.hidden_size, config.initializer_range);
        let pooler = match pooling {
            Pooling::Cls => Some(Dense::new(vb.pp("bert.pooler.dense"), h, h, std)?),
            Pooling::Mean => None,
        };
        Ok(Self {
            bert: BertModel::new(vb.pp("bert"), config)?,
            pooler,
            classifier: Dense::new(vb.pp("classifier"), h, num_labels, std)?,
            dropout: config.classifier_dropout(),
        })
    }

    pub fn forward_t(&self, input: &BertInput, train: bool) -> Result<ClassifierOutput> {
        let hidden = self.bert.forward_t(input, train)?;
        let pooled = match &self.pooler {
            Some(dense) => dense.forward(&hidden.i((.., 0))?)?.tanh()?,
            None => masked_mean(&hidden, input.attention_mask.as_ref())?,
        };
        let logits = self
            .classifier
            .forward(&dropout(&pooled, self.dropout, train)?)?;
        Ok(ClassifierOutput {
            hidden,
            pooled,
            logits,
        })
    }

    /// Logits (sequences, num_labels) of unpadded sequences, each row equal to the row
    /// of the same sequence classified alone (see [`BertModel::forward_packed`]).
    pub fn classify_packed(&self, sequences: &[Sequence]) -> Result<Tensor> {
        let hidden = self.bert.forward_packed(sequences)?;
        let mut starts = Vec::with_capacity(sequences.len());
        let mut offset = 0u32;
        for sequence in sequences {
            starts.push(offset);
            offset += sequence.ids.len() as u32;
        }
        let pooled = match &self.pooler {
            Some(dense) => {
                let cls = Tensor::from_vec(starts, sequences.len(), hidden.device())?;
                dense.forward(&hidden.index_select(&cls, 0)?)?.tanh()?
            }
            None => {
                let means = starts
                    .iter()
                    .zip(sequences)
                    .map(|(&start, s)| {
                        hidden
                            .narrow(0, start as usize, s.ids.len())?
                            .mean_keepdim(0)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&means, 0)?
            }
        };
        self.classifier.forward(&pooled)
    }
}
