// The published piece, as it is: piecework bundles it with its Node host.
export * from '@activepieces/piece-data-mapper';
