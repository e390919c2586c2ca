//! `merge`: shallow-merges objects, later keys winning.

use piecework_sdk::prelude::*;
use serde_json::{Map, Value};

pub struct Merge;

#[derive(serde::Deserialize)]
pub struct Input {
    objects: Vec<Map<String, Value>>,
}

impl Action for Merge {
    type Input = Input;
    type Output = Map<String, Value>;

    fn spec(&self) -> ActionSpec {
        ActionSpec::new("merge", "Merge objects")
            .description("Shallow-merges a list of objects; later keys win")
            .prop(Prop::array_of("objects", "Objects", PropKind::Object).required())
    }

    async fn run(&self, _ctx: &Context, input: Input) -> Result<Map<String, Value>, PieceError> {
        Ok(input.objects.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn later_keys_win() {
        let piece = crate::piece().unwrap();
        let out = piece
            .action("merge")
            .unwrap()
            .run_json(
                &Context::for_test("m"),
                json!({"objects": [{"a": 1, "b": 1}, {"b": 2}]}),
            )
            .await
            .unwrap();
        assert_eq!(out, json!({"a": 1, "b": 2}));
    }
}
