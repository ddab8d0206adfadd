mod common;
use common::*;

#[tokio::test]
async fn select_through_the_proxy() {
    let proxy = app("smoke", "pool_size = 2").await;
    let c = proxy.client("smoke").await;
    assert_eq!(scalar(&c, "SELECT 40 + 2").await, "42");
    let rows = c
        .query_typed(
            "SELECT $1::int + 1",
            &[(&41i32, tokio_postgres::types::Type::INT4)],
        )
        .await
        .unwrap();
    let v: i32 = rows[0].get(0);
    assert_eq!(v, 42);
}
